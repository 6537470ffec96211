"""The health port: answered from its own thread while the event loop is busy or blocked.

The loop's lag is in every answer; a loop that has not ticked for
`stall_s` is reported 503 (wedged), and answers 200 again once it runs.
Waits are bounded polls at the ticker's period, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from serve_apps.host.health_listener import HealthListener, LoopTicker, health_answer
from tests.conftest import free_port
from tests.gateway_process import GatewayProcess


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_lag_is_the_age_of_the_last_tick_beyond_the_period() -> None:
    clock = FakeClock()  # times are binary fractions: the sums below are exact
    ticker = LoopTicker(0.125, clock)
    assert ticker.lag_s() == 0.0
    clock.now += 0.125
    assert ticker.lag_s() == 0.0  # on time
    clock.now += 0.5
    assert ticker.lag_s() == 0.5


def test_answer_is_503_stalled_past_the_bound() -> None:
    clock = FakeClock()
    ticker = LoopTicker(0.125, clock)
    status, body = health_answer(ticker, 2.0, lambda: {"models": 3})
    assert (status, body) == (200, b'{"status": "ok", "loop_lag_ms": 0, "models": 3}')
    clock.now += 2.125
    assert health_answer(ticker, 2.0, dict)[0] == 200  # 2 s behind: busy, not wedged
    clock.now += 0.25
    status, body = health_answer(ticker, 2.0, dict)
    assert status == 503 and b'"status": "stalled"' in body and b'"loop_lag_ms": 2250' in body


@pytest.fixture
def loop_in_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def poll(check: Callable[[], bool], what: str, period_s: float, attempts: int = 1000) -> None:
    for _ in range(attempts):
        if check():
            return
        threading.Event().wait(period_s)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_listener_answers_while_the_loop_is_blocked_and_reports_it(
        loop_in_thread: asyncio.AbstractEventLoop) -> None:
    tick_s, stall_s = 0.01, 0.05
    ticker = LoopTicker(tick_s)
    loop_in_thread.call_soon_threadsafe(ticker.start, loop_in_thread)
    listener = HealthListener("127.0.0.1", 0, ticker, stall_s, lambda: {"models": 1})
    listener.start()
    url = f"http://127.0.0.1:{listener.port}/health"
    try:
        with httpx.Client(timeout=5) as client:
            poll(lambda: client.get(url).status_code == 200, "a running loop to be healthy", tick_s)
            assert client.get(url).json()["models"] == 1
            assert client.head(url).status_code == 200
            assert client.get(f"http://127.0.0.1:{listener.port}/v1/models").status_code == 404
            # Wedge the loop: a callback that does not return until the test says so.
            release = threading.Event()
            loop_in_thread.call_soon_threadsafe(release.wait)
            try:
                poll(lambda: client.get(url).status_code == 503, "the blocked loop to be reported", tick_s)
                stalled = client.get(url)
                assert stalled.json()["status"] == "stalled"
                assert stalled.json()["loop_lag_ms"] > stall_s * 1000
            finally:
                release.set()
            poll(lambda: client.get(url).status_code == 200, "the loop to be healthy again", tick_s)
    finally:
        loop_in_thread.call_soon_threadsafe(ticker.stop)
        listener.stop()


def test_packserve_gateway_serves_the_health_port(tmp_path: Path) -> None:
    health_port = free_port()
    with GatewayProcess(tmp_path, extra_args=["--health-port", str(health_port)]) as gw:
        r = httpx.get(f"http://127.0.0.1:{health_port}/health", timeout=10)
        assert r.status_code == 200
        body = r.json()
        assert body["status"] == "ok" and body["settlements_pending"] == 0
        assert body["models"] == httpx.get(f"{gw.base_url}/health", timeout=10).json()["models"]
        assert f"health: http://127.0.0.1:{health_port}/health" in gw.log_path.read_text()
