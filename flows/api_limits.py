"""A cap on request bodies, enforced before FastAPI reads them.

Why a raw ASGI middleware: FastAPI reads and parses a JSON body before any dependency (the
bearer-token check included) runs, and neither it nor uvicorn limits the size. Without this,
anyone who can reach the port could make the server buffer gigabytes before answering 401.
"""

from __future__ import annotations

import json
from typing import Any

#: The largest request body accepted: a complete run with thousands of metrics fits easily.
MAX_BODY_BYTES = 16 * 1024 * 1024


class BodyTooLarge(Exception):
    """Raised from ``receive`` once a streamed body passes the cap."""


class BodyLimit:
    """ASGI middleware: 413 for a declared or streamed body over ``max_bytes``."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counting_receive() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps({"detail": f"request body larger than {self.max_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
