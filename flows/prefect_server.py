"""The Prefect server that service commands talk to: where it is, whether it answers, UI links.

``quantmill run`` needs no server (Prefect starts a temporary one). Deploying, submitting,
watching jobs and running a worker need a real one, named by ``PREFECT_API_URL``; these commands
check it answers within seconds before anything else, so an unreachable server is one line, not
a hang inside Prefect's client retries.
"""

from __future__ import annotations

import httpx

from quantmill.plugins.errors import QuantmillError

HEALTH_TIMEOUT_S = 5.0
#: every quantmill flow run carries it: what ``quantmill jobs list`` lists
SERVICE_TAG = "quantmill"


class ServiceError(QuantmillError):
    """A Prefect server, work pool, deployment or flow run problem, said in one line."""


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, profile, temporary settings)."""
    from prefect.settings import PREFECT_API_URL

    value = (PREFECT_API_URL.value() or "").strip().rstrip("/")
    return value or None


def api_url() -> str:
    url = configured_api_url() or ""
    if not url:
        raise ServiceError("no Prefect server configured: set PREFECT_API_URL (e.g. "
                           "http://127.0.0.1:4200/api after `prefect server start`)")
    if not url.startswith(("http://", "https://")):
        raise ServiceError(f"PREFECT_API_URL={url!r} is not an http(s) URL")
    return url


def check_server(timeout: float = HEALTH_TIMEOUT_S) -> str:
    """Return the API URL once its health endpoint answers; raise ``ServiceError`` otherwise."""
    url = api_url()
    try:
        response = httpx.get(f"{url}/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise ServiceError(f"the Prefect server at {url} is unreachable "
                           f"({type(exc).__name__}: {exc or 'no answer'})") from None
    if response.status_code != 200:
        raise ServiceError(f"the Prefect server at {url} answered {response.status_code} to a "
                           "health check; is PREFECT_API_URL the API URL (ending in /api)?")
    return url


def ui_url(path: str = "") -> str:
    """A link into the Prefect UI (``PREFECT_UI_URL``, else the API URL without ``/api``)."""
    from prefect.settings import PREFECT_UI_URL

    base = (PREFECT_UI_URL.value() or "").strip().rstrip("/")
    if not base:
        base = api_url().removesuffix("/api")
    return f"{base}/{path.lstrip('/')}" if path else base


def flow_run_link(flow_run_id: object) -> str:
    return ui_url(f"runs/flow-run/{flow_run_id}")
