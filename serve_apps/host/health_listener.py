"""A health port answered from a thread of its own, with the event loop's lag in the answer.

`/health` on the API port is served by the event loop, so when the loop is
saturated (thousands of streams on one core) a probe waits behind every
callback ready before it, and a load balancer takes a busy gateway for a dead
one. This listener runs on its own thread: it answers at once whatever the
loop is doing, and reports how far behind the loop is, from a tick the loop
itself writes every `tick_s`. A loop whose last tick is older than `stall_s`
is wedged, not busy: the answer is then 503, so a probe still detects a
gateway that stopped working.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Clock = Callable[[], float]


class LoopTicker:
    """The loop's side: `start()` on the loop writes `last_tick` every `tick_s`."""

    def __init__(self, tick_s: float, clock: Clock = time.monotonic) -> None:
        self.tick_s = tick_s
        self.clock = clock
        self.last_tick = clock()
        self._handle: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.last_tick = self.clock()
        self._handle = loop.call_later(self.tick_s, self.start, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def lag_s(self) -> float:
        """How late the loop is: the age of its last tick beyond the period."""
        return max(0.0, self.clock() - self.last_tick - self.tick_s)


def health_answer(ticker: LoopTicker, stall_s: float, details: Callable[[], dict[str, Any]]) -> tuple[int, bytes]:
    """The status and JSON body of one probe."""
    lag = ticker.lag_s()
    stalled = lag > stall_s
    body = {"status": "stalled" if stalled else "ok", "loop_lag_ms": int(lag * 1000), **details()}
    return (503 if stalled else 200), json.dumps(body).encode()


class HealthListener:
    """`GET /health` (and `HEAD`) on `host:port`, from a daemon thread; any other path is 404."""

    def __init__(self, host: str, port: int, ticker: LoopTicker, stall_s: float,
                 details: Callable[[], dict[str, Any]]) -> None:
        class Handler(BaseHTTPRequestHandler):
            timeout = 5  # a probe that never finishes its request must not hold a thread for ever

            # Probes come often; one log line each would drown the gateway's log.
            def log_message(self, format: str, *args: Any) -> None:
                return

            def _reply(self, with_body: bool) -> None:
                if self.path.split("?", 1)[0] != "/health":
                    status, body = 404, b'{"error": "not found"}'
                else:
                    status, body = health_answer(ticker, stall_s, details)
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.send_header("cache-control", "no-store")
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self) -> None:
                self._reply(True)

            def do_HEAD(self) -> None:
                self._reply(False)

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="packserve-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
