"""SPEC §1 through HTTP: worked examples with injected time, queueing across two gateway
processes, disconnects, /v2/quotas as quota widgets parse it, and bad input charging nothing."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cluster.records import UsageEvent
from cluster.store import Lease, Settlement
from tests.live_gateway import ADMIN_TOKEN, LiveGateway, free_port

LARGE = "hf:packserve/sim-large"  # $3.40/M output: weight 1.0
SMALL = "hf:packserve/sim-small"  # $2.00/M output: weight 0.588…, small size class
T0 = 1_800_000_000_000


class FakeClock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def gw(redis_url: str, tmp_path: Path, clock: FakeClock) -> Iterator[LiveGateway]:
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path, clock=clock, queue_timeout_s=0) as g:
        yield g


def chat(base_url: str, key: str, model: str = LARGE, **kw: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **kw}
    return httpx.post(f"{base_url}/v1/chat/completions", json=body, headers={"authorization": f"Bearer {key}"},
                      timeout=30)


def test_standard_pack_burst_and_one_tick_over_http(gw: LiveGateway, clock: FakeClock) -> None:
    _, key = gw.new_key(["standard"])
    with httpx.Client(base_url=gw.base_url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
        body = {"model": LARGE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        codes = [c.post("/v1/chat/completions", json=body).status_code for _ in range(500)]
        assert codes == [200] * 500
        refused = c.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "request_bar_empty"
        assert 0 < int(refused.headers["retry-after"]) <= 180
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        clock.now += 180_000
        codes = [c.post("/v1/chat/completions", json=body).status_code for _ in range(26)]
        assert codes == [200] * 25 + [429]


def test_two_dollar_model_fits_850(gw: LiveGateway) -> None:
    _, key = gw.new_key(["standard"])
    with httpx.Client(base_url=gw.base_url, headers={"authorization": f"Bearer {key}"}, timeout=30) as c:
        body = {"model": SMALL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        ok = sum(c.post("/v1/chat/completions", json=body).status_code == 200 for _ in range(851))
    assert ok == 850
    assert gw.quotas(key)["rollingFiveHourLimit"]["remaining"] == 0


def test_two_founder_packs_over_http(gw: LiveGateway) -> None:
    account_id, key = gw.new_key(["founder", "founder"])
    q = gw.quotas(key)
    assert q["rollingFiveHourLimit"]["max"] == 1500
    assert q["weeklyTokenLimit"]["maxCredits"] == "$72.00"
    limits = gw.admin.get(f"/admin/v1/accounts/{account_id}").json()["limits"]
    assert (limits["concurrency_standard"], limits["concurrency_small"]) == (2, 4)


def test_weekly_bar_recharges_from_zero_over_http(gw: LiveGateway, clock: FakeClock) -> None:
    account_id, key = gw.new_key(["founder"])
    # A settled request worth exactly $36.00 (30M prompt tokens at $1.20/M) drains the bar to 0.
    assert gw.runtime is not None
    store = gw.runtime.store
    lease = Lease("lease_drain", account_id, LARGE, 0, clock.now, clock.now + 1000)
    event = UsageEvent(clock.now, account_id, "k", LARGE, 30_000_000, 0, 0, 0, 36 * 10**12, "ok", 1, 1, "lease_drain")
    gw.run(store.settle(Settlement(lease, 36 * 10**12, 0, event, 14 * 86_400_000), clock.now))
    q = gw.quotas(key)
    assert q["weeklyTokenLimit"]["remainingCredits"] == "$0.00"
    refused = chat(gw.base_url, key)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "weekly_tokens_exhausted"
    assert int(refused.headers["retry-after"]) == 3 * 3600
    clock.now += 3 * 3_600_000
    assert gw.quotas(key)["weeklyTokenLimit"]["remainingCredits"] == "$0.72"
    clock.now += 147 * 3_600_000
    q = gw.quotas(key)
    assert q["weeklyTokenLimit"]["remainingCredits"] == "$36.00"
    assert q["weeklyTokenLimit"]["nextRegenAt"] is None


# -- /v2/quotas as widgets parse it ---------------------------------------------------

ISO = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
MONEY = re.compile(r"^\$\d+\.\d{2}$")


def test_quotas_shape_for_widgets(gw: LiveGateway, clock: FakeClock) -> None:
    _, key = gw.new_key(["standard"])
    full = gw.quotas(key)
    assert full["rollingFiveHourLimit"]["nextTickAt"] is None  # a full bar accrues nothing
    assert chat(gw.base_url, key).status_code == 200
    q = gw.quotas(key)
    sub, rolling, weekly = q["subscription"], q["rollingFiveHourLimit"], q["weeklyTokenLimit"]
    assert isinstance(sub["limit"], int) and isinstance(sub["requests"], int | float)
    assert ISO.match(sub["renewsAt"])
    assert isinstance(rolling["remaining"], int | float) and rolling["remaining"] == 499
    assert rolling["max"] == 500 and rolling["limited"] is False
    assert ISO.match(rolling["nextTickAt"])
    assert rolling["nextTickAt"] == time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime((T0 + 180_000) / 1000))
    assert isinstance(rolling["tickPercent"], int | float)
    assert isinstance(weekly["percentRemaining"], int | float) and 0 <= weekly["percentRemaining"] <= 100
    for field in ("maxCredits", "remainingCredits", "nextRegenCredits"):
        assert MONEY.match(weekly[field]), weekly[field]
    assert weekly["maxCredits"] == "$24.00" and weekly["nextRegenCredits"] == "$0.48"
    assert ISO.match(weekly["nextRegenAt"])
    # Free: asking does not move either bar.
    for _ in range(5):
        gw.quotas(key)
    assert gw.quotas(key)["rollingFiveHourLimit"]["remaining"] == 499


# -- bad input: a clear 4xx, never a 500, nothing charged ---------------------------------

BAD_BODIES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("/v1/chat/completions", b"{not json", {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", b"[1, 2]", {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", json.dumps({"model": LARGE}).encode(), {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", json.dumps({"model": LARGE, "messages": []}).encode(),
     {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", json.dumps({"model": LARGE, "messages": "hi"}).encode(),
     {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", json.dumps({"model": LARGE, "messages": [{"role": "user", "content": "x"}],
                                         "max_tokens": -1}).encode(), {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", json.dumps({"model": LARGE, "messages": [{"role": "user", "content": "x"}],
                                         "temperature": "hot"}).encode(), {"content-type": "application/json"}, 400),
    ("/v1/chat/completions", b"model=x", {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("/v1/chat/completions", json.dumps({"model": "hf:no/such", "messages": [{"role": "user", "content": "x"}]}
                                        ).encode(), {"content-type": "application/json"}, 404),
    ("/v1/messages", json.dumps({"model": LARGE, "messages": [{"role": "user", "content": "x"}]}).encode(),
     {"content-type": "application/json"}, 400),
    ("/v1/messages", json.dumps({"model": LARGE, "max_tokens": 0, "messages": [{"role": "user", "content": "x"}]}
                                ).encode(), {"content-type": "application/json"}, 400),
    ("/v1/embeddings", json.dumps({"model": "hf:packserve/sim-embed", "input": [1, 2]}).encode(),
     {"content-type": "application/json"}, 400),
    ("/v1/responses", b"{not json", {"content-type": "application/json"}, 400),
    ("/v1/responses", json.dumps({"model": LARGE}).encode(), {"content-type": "application/json"}, 400),
    ("/v1/responses", json.dumps({"model": LARGE, "input": 42}).encode(), {"content-type": "application/json"}, 400),
    ("/v1/responses", json.dumps({"model": LARGE, "input": [{"type": "mystery"}]}).encode(),
     {"content-type": "application/json"}, 400),
    ("/openai/v1/responses", json.dumps({"model": LARGE, "input": "x", "max_output_tokens": 0}).encode(),
     {"content-type": "application/json"}, 400),
    ("/v1/responses", b"model=x", {"content-type": "application/x-www-form-urlencoded"}, 415),
    ("/v1/responses", json.dumps({"model": "hf:no/such", "input": "x"}).encode(),
     {"content-type": "application/json"}, 404),
    ("/v1/no/such/route", b"{}", {"content-type": "application/json"}, 404),
]


@pytest.mark.parametrize(("path", "raw", "headers", "status"), BAD_BODIES)
def test_bad_input_is_4xx_in_the_api_shape(gw: LiveGateway, path: str, raw: bytes, headers: dict[str, str],
                                           status: int) -> None:
    _, key = gw.new_key(["standard"])
    r = httpx.post(f"{gw.base_url}{path}", content=raw, headers={**headers, "authorization": f"Bearer {key}"})
    assert r.status_code == status, r.text
    body = r.json()
    if path.endswith("/messages"):
        assert body["type"] == "error" and body["error"]["message"]
    else:
        assert body["error"]["message"] and "Traceback" not in r.text
    assert gw.quotas(key)["rollingFiveHourLimit"]["remaining"] == 500


def test_body_over_the_size_limit_is_413(redis_url: str, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path, max_body_bytes=4096) as g:
        _, key = g.new_key()
        big = {"model": LARGE, "messages": [{"role": "user", "content": "x" * 10_000}]}
        r = httpx.post(f"{g.base_url}/v1/chat/completions", json=big, headers={"authorization": f"Bearer {key}"})
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_revoked_key_and_suspended_account(gw: LiveGateway) -> None:
    account_id, key = gw.new_key()
    keys = gw.admin.get(f"/admin/v1/accounts/{account_id}/keys").json()["data"]
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    assert gw.admin.post(f"/admin/v1/accounts/{account_id}/suspend").status_code == 200
    gw.runtime.accounts.forget_cached() if gw.runtime else None
    with pytest.raises(openai.PermissionDeniedError):
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "x"}])
    assert gw.admin.delete(f"/admin/v1/keys/{keys[0]['id']}").status_code == 204
    gw.runtime.accounts.forget_cached() if gw.runtime else None
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "x"}])


# -- disconnects ----------------------------------------------------------------------------

def test_disconnect_mid_stream_frees_the_slot_and_bills_what_was_generated(redis_url: str, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_url, data_dir=tmp_path, tokens_per_s=50, queue_timeout_s=0) as g:
        account_id, key = g.new_key(["standard"])
        body = {"model": LARGE, "stream": True, "max_tokens": 500,
                "messages": [{"role": "user", "content": "write a long story"}]}
        with httpx.Client(timeout=30) as c, c.stream("POST", f"{g.base_url}/v1/chat/completions", json=body,
                                                     headers={"authorization": f"Bearer {key}"}) as r:
            assert r.status_code == 200
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 6:
                    break
        closed_at = time.monotonic()
        # Concurrency is 1: the slot must come back within a second.
        while True:
            second = chat(g.base_url, key)
            if second.status_code == 200 or time.monotonic() - closed_at > 1.0:
                break
            time.sleep(0.02)
        assert second.status_code == 200, second.text
        events = g.usage_events(account_id)
        aborted = [e for e in events if e["status"] == "aborted"]
        assert len(aborted) == 1
        assert 3 <= aborted[0]["completion_tokens"] < 500
        assert aborted[0]["cost_pico"] > 0
        assert g.engine.in_flight == set()


# -- two gateway processes on one Redis ------------------------------------------------------

def start_gateway_process(redis_url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {**os.environ, "PACKSERVE_ADMIN_TOKEN": ADMIN_TOKEN, "PACKSERVE_DATA_DIR": str(data_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "serve_apps", "gateway", "--engine", "sim", "--port", str(port),
                             "--redis-url", redis_url, "--sim-tokens-per-s", "50"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/health", timeout=0.5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("gateway process did not start")


@pytest.mark.slow
def test_two_gateways_share_concurrency_and_queue_in_order(redis_url: str, tmp_path: Path) -> None:
    procs = [start_gateway_process(redis_url, tmp_path / f"gw{i}") for i in range(2)]
    try:
        admin = httpx.Client(base_url=procs[0][1], headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        account = admin.post("/admin/v1/accounts", json={"name": "two", "plan": "subscription",
                                                         "packs": ["standard"]}).json()
        key = admin.post(f"/admin/v1/accounts/{account['id']}/keys").json()["key"]
        spans: dict[int, tuple[float, float]] = {}
        # Clients are made up front: building one takes tens of ms, which would reorder arrivals.
        clients = [httpx.Client(base_url=procs[i % 2][1], timeout=60,
                                headers={"authorization": f"Bearer {key}"}) for i in range(6)]

        def one(i: int) -> None:
            body = {"model": LARGE, "stream": True, "max_tokens": 15,
                    "messages": [{"role": "user", "content": f"request {i}"}]}
            with clients[i].stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200, r.read()
                first: float | None = None
                for line in r.iter_lines():
                    if first is None and '"content"' in line:
                        first = time.monotonic()
                spans[i] = (first or time.monotonic(), time.monotonic())

        def load() -> tuple[int, int]:
            stats = [admin.get(f"{base}/admin/v1/stats").json() for _, base in procs]
            return sum(s["in_flight"] for s in stats), sum(s["queued_total"] for s in stats)

        threads = []
        for i in range(6):
            t = threading.Thread(target=one, args=(i,))
            t.start()
            threads.append(t)
            # A known arrival order: wait until request i is admitted (i == 0) or queued.
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                in_flight, queued = load()
                if (i == 0 and in_flight >= 1) or (i > 0 and queued >= i):
                    break
                time.sleep(0.005)
        for t in threads:
            t.join(60)
        for c in clients:
            c.close()
        assert sorted(spans) == list(range(6))
        ordered = sorted(spans.items(), key=lambda kv: kv[1][0])
        # Served in arrival order, one at a time across both gateways.
        assert [i for i, _ in ordered] == list(range(6))
        for (_, (_, end)), (_, (start, _)) in itertools.pairwise(ordered):
            assert start >= end - 0.005, ordered
        assert admin.get(f"/admin/v1/accounts/{account['id']}/usage").json()["totals"]["requests"] == 6
    finally:
        for proc, _ in procs:
            proc.terminate()
            proc.wait(10)
