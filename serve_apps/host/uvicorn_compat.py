"""uvicorn's HTTP/1.1 protocol with a request-header deadline: the uvicorn internals packserve relies on.

uvicorn (0.55) arms its keep-alive timer only when a response completes, and
cancels it on the first byte the client sends. So a connection that never
sends a request is never timed out, and neither is a client that trickles
its request headers a byte at a time (each byte cancels the timer and
nothing re-arms it until a response is sent): both hold a socket and a file
descriptor for as long as the client likes. `header_timeout_protocol` adds
a deadline that starts when the server begins waiting for a request (the
connection opened, or the previous response completed) and is cancelled
only when that request's headers are complete; past it the connection is
closed (with a 408 if part of a request had arrived). Idle keep-alive
connections keep uvicorn's own timer (`timeout_keep_alive`).

The subclass overrides protocol callbacks and reads attributes that uvicorn
does not document; VENDOR_NAMES lists them for tests/test_vendor_compat.py,
which fails by name when an upgrade changes one.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from serve_apps.vendor import VendorName

# The release these names were checked against (requirements.lock pins it).
PINNED_VERSION = "0.55.0"
# uvicorn's own default `timeout_keep_alive`, kept when the config sets none.
UVICORN_KEEP_ALIVE_S = 5

_IMPL = "uvicorn.protocols.http.httptools_impl"
VENDOR_NAMES: tuple[VendorName, ...] = (
    VendorName(_IMPL, "HttpToolsProtocol.__init__", params=("config", "server_state", "app_state", "_loop")),
    VendorName(_IMPL, "HttpToolsProtocol.connection_made", params=("transport",)),
    VendorName(_IMPL, "HttpToolsProtocol.connection_lost", params=("exc",)),
    VendorName(_IMPL, "HttpToolsProtocol.data_received", params=("data",)),
    VendorName(_IMPL, "HttpToolsProtocol.on_headers_complete"),
    VendorName(_IMPL, "HttpToolsProtocol.on_response_complete"),
    # Read by the deadline: the event loop, the transport, whether a response is under way.
    VendorName(_IMPL, "HttpToolsProtocol", attrs=("loop", "transport", "cycle", "timeout_keep_alive_task")),
    VendorName(_IMPL, "RequestResponseCycle", attrs=("response_complete",)),
    # `uvicorn.Config(http=<a protocol class>)` is how the class is handed to the server.
    VendorName("uvicorn.config", "Config.__init__", params=("http", "timeout_keep_alive")),
)

TIMEOUT_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                    b"content-length: 36\r\nconnection: close\r\n\r\nrequest headers not received in time")


class _HeaderDeadlineProtocol(HttpToolsProtocol):
    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._request_bytes = False  # bytes of a request arrived since the deadline was armed

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._request_bytes = False
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_deadline_passed)

    def _cancel_header_deadline(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_deadline_passed(self) -> None:
        self._header_timer = None
        if self.transport.is_closing() or (self.cycle is not None and not self.cycle.response_complete):
            return
        if self._request_bytes:
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._request_bytes = self._request_bytes or self._header_timer is not None
        super().data_received(data)

    def on_headers_complete(self) -> None:
        self._cancel_header_deadline()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # uvicorn armed its keep-alive timer: the connection now waits for its next request's headers
        # (no pipelined request was started instead).
        if self.timeout_keep_alive_task is not None:
            self._arm_header_deadline()


def header_timeout_protocol(header_timeout_s: float) -> type[asyncio.Protocol]:
    """The protocol class to pass as `uvicorn.Config(http=...)`: uvicorn's, with a `header_timeout_s` deadline."""
    if header_timeout_s <= 0:
        raise ValueError("header_timeout_s must be positive")
    return type("HeaderDeadlineProtocol", (_HeaderDeadlineProtocol,), {"header_timeout_s": header_timeout_s})
