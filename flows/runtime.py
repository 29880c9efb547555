"""Prefect settings for quantmill's embedded default (no server), and its logs in flow runs."""

from __future__ import annotations

import logging
import os

from quantmill.plugins.home import quantmill_home

EMBEDDED_DEFAULTS = {
    # The temporary server's migrations take ~15 s on a busy 2-core machine; 20 s is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    # Offline machines otherwise log telemetry errors on every start.
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # quantmill's loggers also log outside flow runs (the CLI): not an error for Prefect
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
EXTRA_LOGGERS = "PREFECT_LOGGING_EXTRA_LOGGERS"
#: the level of quantmill's loggers; a worker sets INFO so its runs' pages show the job's steps
LOG_LEVEL_ENV = "QUANTMILL_LOG_LEVEL"


def configure_prefect_environment() -> None:
    """Set defaults for Prefect's environment variables; never override the user's values."""
    os.environ.setdefault("PREFECT_HOME", str(quantmill_home() / "prefect"))
    for key, value in EMBEDDED_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Prefect copies its API log handler onto these loggers when ``prefect.main`` is first
    # imported, so this must happen before any ``from prefect import ...``.
    extra = [name.strip() for name in os.environ.get(EXTRA_LOGGERS, "").split(",")
             if name.strip()]
    if "quantmill" not in extra:
        os.environ[EXTRA_LOGGERS] = ",".join([*extra, "quantmill"])
    level = os.environ.get(LOG_LEVEL_ENV, "").strip().upper()
    if level in ("DEBUG", "INFO", "WARNING", "ERROR"):
        logging.getLogger("quantmill").setLevel(level)


def quiet_prefect_console() -> None:
    """Show only Prefect's warnings and errors in this terminal (the CLI's bars show progress),
    while the run's page still receives every line.

    Raises the level of Prefect's console handler, not ``PREFECT_LOGGING_LEVEL``: that variable
    would also silence the API log handler, and every process started from here (a Dask
    LocalCluster's workers, a test's Prefect workers) would inherit it.
    """
    import prefect.main  # noqa: F401  (configures Prefect's logging when first imported)
    from prefect.logging.handlers import PrefectConsoleHandler

    for handler in logging.getLogger().handlers:
        if isinstance(handler, PrefectConsoleHandler):
            handler.setLevel(logging.WARNING)
