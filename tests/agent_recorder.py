"""A recording reverse proxy between a real agent CLI and the gateway, for the agent tests.

It forwards every request unchanged (streaming the answer back as it comes)
and keeps method, path, query, headers and JSON body of each, with the API
key redacted, so the tests can check what real clients send and commit it as
fixtures (tests/fixtures/agents/) that replay without npm.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from tests.live_gateway import free_port

REDACTED = "REDACTED"
_SECRET_HEADERS = {"authorization", "x-api-key"}
# Hop-by-hop or recomputed headers: never forwarded, never recorded.
_DROPPED = {"host", "content-length", "connection", "transfer-encoding", "accept-encoding", "keep-alive"}


class Recorder:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[dict[str, Any]] = []
        # Each exchange's response body as the client received it (kept for assertions, never saved).
        self.replies: list[bytearray] = []
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"recorder-{self.port}", daemon=True)

    async def _forward(self, request: Request) -> Response:
        raw = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED}
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        entry: dict[str, Any] = {
            "method": request.method, "path": request.url.path, "query": request.url.query,
            "headers": {k: (REDACTED if k.lower() in _SECRET_HEADERS else v) for k, v in sorted(headers.items())},
            "body": body,
        }
        self.exchanges.append(entry)
        received = bytearray()
        self.replies.append(received)
        client = httpx.AsyncClient(timeout=120)
        upstream = client.build_request(request.method, f"{self.upstream}{request.url.path}",
                                        params=request.url.query or None, headers=headers, content=raw)
        reply = await client.send(upstream, stream=True)
        entry["status"] = reply.status_code
        passed = {k: v for k, v in reply.headers.items() if k.lower() not in _DROPPED | {"content-encoding"}}

        async def relay() -> AsyncIterator[bytes]:
            try:
                async for chunk in reply.aiter_raw():
                    received.extend(chunk)
                    yield chunk
            finally:
                await reply.aclose()
                await client.aclose()

        return StreamingResponse(relay(), status_code=reply.status_code, headers=passed)

    def _run(self) -> None:
        app = Starlette(routes=[Route("/{path:path}", self._forward,
                                      methods=["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False, lifespan="off"))
        asyncio.run(self._server.serve())

    def __enter__(self) -> Recorder:
        self._thread.start()
        deadline = time.monotonic() + 20
        while self._server is None or not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the recording proxy did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=15)

    def save(self, path: Path, client: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"client": client, "exchanges": self.exchanges}, indent=1, sort_keys=True) + "\n")
