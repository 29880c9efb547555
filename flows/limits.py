"""Slots for heavy steps (quantize, evaluate) from a Prefect global concurrency limit.

A worker's ``--limit`` bounds the flow runs *it* starts; two workers on one machine (one per pool,
or a Dask cluster beside a worker) would still put two GPTQ runs on two cores. So each heavy step
takes a slot of one limit, chosen by ``QUANTMILL_HEAVY_LIMIT``:

- ``host`` (the default): ``quantmill-heavy-<hostname>``, one per machine;
- ``global``: ``quantmill-heavy``, shared by every machine (e.g. one licence-bound GPU server);
- any other limit name (letters, digits, ``-``), e.g. per team;
- ``none``: no slot.

A missing limit is created with one slot (``quantmill worker --heavy-slots N`` sets its host's
count), so a worker started with ``prefect worker start`` is still bounded. Without a Prefect
server (the embedded ``quantmill run``) there is nothing to share and no slot is taken. Prefect's
tag limits (``prefect concurrency-limit create method:gptq 1``) apply too: a job's tags reach
its task runs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import time
from collections.abc import Iterator

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists

from quantmill.flows.prefect_server import configured_api_url
from quantmill.plugins.errors import ConfigError

LIMIT_ENV = "QUANTMILL_HEAVY_LIMIT"
#: a slot is leased and renewed while the step runs; a killed job's lease expires after this
#: (Prefect's minimum), and the server's repossessor frees the slot within its next 15 s loop
LEASE_S = 60
GLOBAL_LIMIT = "quantmill-heavy"
_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,99}$")
log = logging.getLogger(__name__)
#: limits this process has made sure exist (a heavy step should not ask the server again)
_ensured: set[str] = set()


def host_limit_name(host: str | None = None) -> str:
    host = re.sub(r"[^a-z0-9-]+", "-", (host or socket.gethostname()).lower()).strip("-")
    return f"{GLOBAL_LIMIT}-{host or 'host'}"[:100]


def heavy_limit_name() -> str | None:
    """The limit heavy steps take a slot of here, or None (no server, or ``none``)."""
    if configured_api_url() is None:
        return None
    value = os.environ.get(LIMIT_ENV, "host").strip().lower()
    if value == "none":
        return None
    if value == "host":
        return host_limit_name()
    if value == "global":
        return GLOBAL_LIMIT
    if not _NAME.match(value):
        raise ConfigError(f"{LIMIT_ENV}={value!r}: use host, global, none or a limit name "
                          "(lower-case letters, digits and -)")
    return value


def ensure_limit(name: str, slots: int = 1, *, overwrite: bool = False) -> None:
    """Create the limit with ``slots`` if it is missing (or set it, with ``overwrite``)."""
    with get_client(sync_client=True) as client:
        if overwrite:
            client.upsert_global_concurrency_limit_by_name(name, slots)
            return
        try:
            client.create_global_concurrency_limit(
                GlobalConcurrencyLimitCreate(name=name, limit=slots, active=True))
        except ObjectAlreadyExists:
            pass


@contextlib.contextmanager
def heavy_slot(step: str) -> Iterator[None]:
    """Hold one slot of the heavy-step limit while the block runs."""
    name = heavy_limit_name()
    if name is None:
        yield
        return
    if name not in _ensured:
        ensure_limit(name)
        _ensured.add(name)
    waited = time.monotonic()
    with concurrency(name, occupy=1, strict=True, lease_duration=LEASE_S):
        seconds = time.monotonic() - waited
        if seconds >= 1:
            log.info("%s waited %.1f s for a slot of the concurrency limit %s", step, seconds,
                     name)
        yield
