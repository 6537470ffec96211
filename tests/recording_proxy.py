"""A loopback HTTP proxy that records what a real client sends, for tests that drive agent CLIs.

The client (Codex CLI) talks to the proxy, which forwards every request to
the gateway unchanged and streams the answer back as it arrives, keeping a
copy of each request (its API key redacted) and of each response body. Tests
assert on what the client really sent and save it as a replay fixture.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx

# Hop-by-hop headers and those the proxy sets itself are not forwarded.
_SKIP_REQUEST = {"host", "content-length", "connection", "accept-encoding", "transfer-encoding"}
_SKIP_RESPONSE = {"content-length", "connection", "transfer-encoding", "content-encoding"}
REDACTED = "Bearer <redacted>"


@dataclass
class Exchange:
    method: str
    path: str
    headers: dict[str, str]  # as sent, `authorization` redacted
    body: Any  # the JSON body, or None
    status: int = 0
    raw_response: bytearray = field(default_factory=bytearray)

    @property
    def response(self) -> str:
        """The response body as text (for SSE: every event)."""
        return self.raw_response.decode()

    def recorded(self) -> dict[str, Any]:
        return {"method": self.method, "path": self.path, "headers": self.headers, "body": self.body}


@dataclass
class RecordingProxy:
    upstream: str
    timeout_s: float = 120.0
    exchanges: list[Exchange] = field(default_factory=list)

    def __post_init__(self) -> None:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # quiet: tests read the exchanges
                pass

            def _forward(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                shown = {k: (REDACTED if k in ("authorization", "x-api-key") else v) for k, v in headers.items()
                         if k not in _SKIP_REQUEST}
                exchange = Exchange(self.command, self.path, shown, json.loads(raw) if raw else None)
                proxy.exchanges.append(exchange)
                forward = {k: v for k, v in headers.items() if k not in _SKIP_REQUEST}
                with httpx.Client(timeout=proxy.timeout_s) as client, client.stream(
                        self.command, proxy.upstream + self.path, content=raw, headers=forward) as upstream:
                    exchange.status = upstream.status_code
                    self.send_response(upstream.status_code)
                    for k, v in upstream.headers.items():
                        if k.lower() not in _SKIP_RESPONSE:
                            self.send_header(k, v)
                    self.end_headers()
                    for chunk in upstream.iter_bytes():
                        exchange.raw_response += chunk
                        self.wfile.write(chunk)
                        self.wfile.flush()

            do_GET = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="recording-proxy", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> RecordingProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def sse_payloads(text: str) -> list[dict[str, Any]]:
    """The JSON `data` of every event in an SSE body."""
    out = []
    for frame in text.split("\n\n"):
        for line in frame.splitlines():
            if line.startswith("data:") and line[5:].strip() not in ("", "[DONE]"):
                out.append(json.loads(line[5:]))
    return out
