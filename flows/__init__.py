"""Prefect flows, tasks and the CLI: the only part of quantmill that imports prefect.

Importing this package sets quantmill's Prefect defaults (before prefect itself is imported) for
the embedded mode: Prefect state under ``$QUANTMILL_HOME/prefect``, a start-up timeout long enough
for a busy 2-core machine, and no telemetry. Values already in the environment win, so a team
pointing ``PREFECT_API_URL`` at its server changes nothing here.
"""

from quantmill.flows.runtime import configure_prefect_environment

configure_prefect_environment()
