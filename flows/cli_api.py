"""``quantmill registry serve`` and ``quantmill registry token create|revoke|list``: the HTTP API
and its bearer tokens.

Imported at the end of ``quantmill.flows.cli``, which owns the ``registry`` command group.
"""
