"""``quantmill registry lineage|search|show|compare|export|verify``: the auditor's commands.

Imported at the end of ``quantmill.flows.cli``, which owns the ``registry`` command group.
"""
