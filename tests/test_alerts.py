"""Usage alerts: claims once per crossing on both stores; signed webhooks from two gateways on one Redis.

The receiver is a real HTTP server on 127.0.0.1 that checks every signature.
Waits are for conditions (a delivery arrived, each sender polled again),
never for a fixed time.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import openai
import pytest

from cluster.alerts import EVENT_ID_HEADER, SIGNATURE_HEADER, sign, verify
from cluster.embedded_store import EmbeddedStore
from cluster.store import Store
from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway

SECRET = "whsec-test-0123456789abcdef"
T0 = 1_800_000_000_000


@pytest.fixture(params=["embedded", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    s: Store
    if request.param == "embedded":
        s = EmbeddedStore(None, request_unit=340_000_000)
    else:
        from cluster.redis_store import RedisStore

        s = await RedisStore.connect(request.getfixturevalue("redis_url"), request_unit=340_000_000)
    yield s
    await s.close()


async def test_a_crossing_is_claimed_once_and_rearmed_only_by_a_newer_observation(store: Store) -> None:
    claim = store.claim_alert
    assert await claim("acct", "request_bar:80", True, T0, "a1", '{"id":"a1"}')
    assert not await claim("acct", "request_bar:80", True, T0 + 1, "a2", '{"id":"a2"}')  # same crossing
    assert not await claim("acct", "request_bar:80", False, T0 + 10, "x", "{}")  # recharged: re-armed
    assert not await claim("acct", "request_bar:80", True, T0 + 5, "a3", '{"id":"a3"}')  # a stale observation
    assert await claim("acct", "request_bar:80", True, T0 + 20, "a4", '{"id":"a4"}')  # a new crossing
    assert await claim("acct", "weekly_bar:80", True, T0, "w1", '{"id":"w1"}')  # each bar on its own
    taken = await store.take_alerts(T0 + 20, 10, 1_000, 60_000)
    assert sorted(taken) == [("a1", '{"id":"a1"}', 1), ("a4", '{"id":"a4"}', 1), ("w1", '{"id":"w1"}', 1)]
    assert await store.take_alerts(T0 + 20, 10, 1_000, 60_000) == []  # pushed back by the backoff
    await store.alert_done("a1")
    await store.alert_done("w1")
    assert await store.take_alerts(T0 + 1_020, 10, 1_000, 60_000) == [("a4", '{"id":"a4"}', 2)]
    assert await store.take_alerts(T0 + 2_019, 10, 1_000, 60_000) == []  # the second wait doubles
    assert await store.take_alerts(T0 + 3_020, 10, 1_000, 60_000) == [("a4", '{"id":"a4"}', 3)]


def test_signature_is_checked_with_its_timestamp() -> None:
    body = b'{"id":"alrt_1"}'
    header = sign(SECRET, body, 1_700_000_000)
    assert verify(SECRET, body, header, 1_700_000_100)
    assert not verify(SECRET, body + b" ", header, 1_700_000_100)
    assert not verify("another-secret-0123456789", body, header, 1_700_000_100)
    assert not verify(SECRET, body, header, 1_700_000_000 + 301)  # a replay, too old


# -- a receiver, two gateways, one Redis ---------------------------------------------------------

class Receiver:
    """Records every POST; `fail` answers 500 that many times; `hang` holds requests until released."""

    def __init__(self) -> None:
        self.deliveries: list[dict[str, Any]] = []
        self.fail = 0
        self.hang = threading.Event()
        self.release = threading.Event()
        self.hanging = 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if receiver.hang.is_set():
                    with receiver.lock:
                        receiver.hanging += 1
                    receiver.release.wait(60)
                    with receiver.lock:
                        receiver.hanging -= 1
                with receiver.lock:
                    status = 500 if receiver.fail > 0 else 200
                    receiver.fail -= status == 500
                    receiver.deliveries.append({
                        "status": status, "body": json.loads(body), "event_id": self.headers[EVENT_ID_HEADER],
                        "signed": verify(SECRET, body, self.headers[SIGNATURE_HEADER], int(time.time()))})
                self.send_response(status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def for_account(self, account_id: str) -> list[dict[str, Any]]:
        with self.lock:
            return [d for d in self.deliveries if d["body"]["account_id"] == account_id]


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.release.set()
    r.server.shutdown()


@pytest.fixture(scope="module")
def gateways(redis_server: RedisServer, receiver: Receiver,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveGateway, LiveGateway]]:
    # $0.10/M reference: a sim-large request ($3.40/M output) weighs 34, so 12 of them pass 80% of 500.
    extra: dict[str, dict[str, Any]] = {"admission": {"reference_price": "0.10"},
             "alerts": {"webhook_url": receiver.url, "secret": SECRET, "poll_interval_s": 0.05,
                        "backoff_base_s": 0.05, "backoff_cap_s": 0.2, "timeout_s": 30}}
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-a1"), queue_timeout_s=0,
                     extra=extra) as one, \
            LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-a2"), queue_timeout_s=0,
                        extra=extra) as two:
        yield one, two


def _chat(gw: LiveGateway, key: str) -> None:
    openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=30).chat.completions.create(
        model="hf:packserve/sim-large", messages=[{"role": "user", "content": "hi"}], max_tokens=4)


def _wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(600):
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _settled(gws: tuple[LiveGateway, LiveGateway]) -> None:
    """Every observation processed and each sender polled twice more: nothing left to deliver."""
    for gw in gws:
        assert gw.runtime is not None and gw.runtime.alerts is not None
        alerts = gw.runtime.alerts
        _wait_for(lambda a=alerts: a.monitor._queue.empty(), "the alert monitor to drain")  # type: ignore[misc]
        start = alerts.sender.polls
        _wait_for(lambda a=alerts, s=start: a.sender.polls >= s + 2, "two more polls")  # type: ignore[misc]


def test_one_signed_delivery_per_crossing_with_two_gateways(gateways: tuple[LiveGateway, LiveGateway],
                                                            receiver: Receiver) -> None:
    one, two = gateways
    account_id, key = one.new_key(["standard"])
    for i in range(13):  # alternate gateways: both observe the bar above 80%
        _chat((one, two)[i % 2], key)
    _wait_for(lambda: len(receiver.for_account(account_id)) >= 1, "the 80% alert")
    _settled(gateways)
    got = receiver.for_account(account_id)
    assert len(got) == 1, got
    alert = got[0]
    assert alert["signed"] and alert["status"] == 200 and alert["event_id"] == alert["body"]["id"]
    assert (alert["body"]["bar"], alert["body"]["threshold"], alert["body"]["type"]) == (
        "request_bar", 80, "usage.threshold")


def test_a_failing_receiver_gets_retries_with_the_same_event_id(gateways: tuple[LiveGateway, LiveGateway],
                                                                 receiver: Receiver) -> None:
    one, _ = gateways
    account_id, key = one.new_key(["standard"])
    with receiver.lock:
        receiver.fail = 2
    for _ in range(12):
        _chat(one, key)
    _wait_for(lambda: any(d["status"] == 200 for d in receiver.for_account(account_id)), "a delivery")
    got = receiver.for_account(account_id)
    assert [d["status"] for d in got] == [500, 500, 200]
    assert len({d["event_id"] for d in got}) == 1 and all(d["signed"] for d in got)


def test_a_hanging_receiver_never_delays_a_request(gateways: tuple[LiveGateway, LiveGateway],
                                                  receiver: Receiver) -> None:
    one, _ = gateways
    account_id, key = one.new_key(["standard"])
    receiver.hang.set()
    try:
        for _ in range(12):
            _chat(one, key)
        _wait_for(lambda: receiver.hanging >= 1, "the receiver to hold the alert")
        _chat(one, key)  # completes while the webhook is stuck
        assert receiver.hanging >= 1 and receiver.for_account(account_id) == []
    finally:
        receiver.hang.clear()
        receiver.release.set()
    _wait_for(lambda: len(receiver.for_account(account_id)) >= 1, "the held alert to land")
    receiver.release.clear()


def test_webhook_without_secret_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="secret"):
        LiveGateway(redis_url=None, data_dir=tmp_path, extra={"alerts": {"webhook_url": "http://127.0.0.1:9/x"}}
                    ).start().stop()


async def test_payg_spend_cap_and_key_cap_crossings_are_claimed(store: Store) -> None:
    from cluster.accounts import Accounts
    from cluster.alerts import AlertMonitor, AlertSettings
    from cluster.store import Snapshot
    from policies.admission import Reason
    from policies.units import PICO_PER_DOLLAR

    monitor = AlertMonitor(store, AlertSettings(webhook_url="http://127.0.0.1:9/x", secret=SECRET))
    payg = await Accounts(store).create("p", "payg", spend_cap_usd=10)
    sub = await Accounts(store).create("s", "subscription", ["standard"])
    await monitor.process(monitor_obs(Snapshot(payg, T0, month_spend_pico=7 * PICO_PER_DOLLAR), ""))
    await monitor.process(monitor_obs(Snapshot(payg, T0 + 1, month_spend_pico=8 * PICO_PER_DOLLAR), ""))
    await monitor.process(monitor_obs(Snapshot(payg, T0 + 2, month_spend_pico=10 * PICO_PER_DOLLAR), ""))
    snap = await store.snapshot(sub.id, now_ms=T0)
    await monitor.process(monitor_obs(snap, "key_1", Reason.KEY_REQUEST_CAP_REACHED))
    await monitor.process(monitor_obs(snap, "key_1", Reason.KEY_REQUEST_CAP_REACHED))
    queued = [json.loads(p) for _, p, _ in await store.take_alerts(T0 + 10, 10, 1_000, 60_000)]
    assert sorted((q["bar"], q["threshold"], q.get("key_id")) for q in queued) == [
        ("key_requests", 100, "key_1"), ("payg_spend", 80, None), ("payg_spend", 100, None)]
    assert monitor.claimed == 3


def monitor_obs(snapshot: Any, key_id: str, refused: Any = None) -> Any:
    from cluster.alerts import Observation

    return Observation(snapshot, key_id, refused)
