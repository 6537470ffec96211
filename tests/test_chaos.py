"""Chaos with real processes: Redis (AOF on) restarted under 50 streams, and one of two gateways
SIGKILLed under load. Every stream ends cleanly or with an error in its API's shape; the ledger
holds exactly one event per request the clients saw succeed; nothing leaks."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.controller import CHECKPOINT_GRACE_MS, AdmissionController
from cluster.records import UsageEvent
from cluster.redis_store import RedisStore
from cluster.settings import AdmissionSettings
from serve_apps.engines.sim import SIM_SMALL
from tests.conftest import RedisServer
from tests.gateway_process import GatewayProcess

STREAMS = 50
ACCOUNTS = 5  # 5 founder packs each: 10 concurrent sim-small streams per account, 50 in all


@dataclass
class Outcome:
    status: int = 0
    chunks: int = 0
    done: bool = False  # `data: [DONE]` arrived
    error: dict[str, Any] | None = None  # an error body or error event, in the API's shape
    broken: str | None = None  # the stream ended otherwise: the failure this test exists to catch
    started: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def succeeded(self) -> bool:
        return self.status == 200 and self.done and self.error is None

    @property
    def clean(self) -> bool:
        return self.broken is None and (self.succeeded or _openai_shape(self.error))


def _openai_shape(body: dict[str, Any] | None) -> bool:
    err = (body or {}).get("error")
    return isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str)


async def stream_chat(client: httpx.AsyncClient, key: str, max_tokens: int, out: Outcome,
                      on_chunk: Callable[[], None] | None = None) -> None:
    body = {"model": SIM_SMALL, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "write at length"}]}
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body,
                                 headers={"authorization": f"Bearer {key}"}) as r:
            out.status = r.status_code
            if r.status_code != 200:
                out.error = json.loads(await r.aread())
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    out.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = event
                    continue
                out.chunks += 1
                out.started.set()
                if on_chunk is not None:
                    on_chunk()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        out.broken = f"{type(exc).__name__}: {exc}"
    finally:
        out.started.set()


def ledger(redis_url: str, account_ids: list[str]) -> list[UsageEvent]:
    """Every usage event of these accounts, straight from the store (with lease ids)."""
    async def read() -> list[UsageEvent]:
        store = await RedisStore.connect(redis_url, request_unit=AdmissionSettings().weight_policy.unit)
        try:
            return [e for acct in account_ids for e in await store.usage(acct)]
        finally:
            await store.close()
    return asyncio.run(read())


def chat_once(gw: GatewayProcess, key: str) -> httpx.Response:
    return httpx.post(f"{gw.base_url}/v1/chat/completions", headers={"authorization": f"Bearer {key}"},
                      json={"model": SIM_SMALL, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
                      timeout=30)


@pytest.mark.slow
def test_redis_restarted_under_50_streams(persistent_redis: RedisServer, tmp_path: Path) -> None:
    gw = GatewayProcess(tmp_path / "gw", redis_url=persistent_redis.url,
                        extra_args=["--sim-tokens-per-s", "10"])
    with gw:
        accounts = [gw.new_key(["founder"] * 5) for _ in range(ACCOUNTS)]
        _, probe_key = gw.new_key(["founder"])
        outcomes = [Outcome() for _ in range(STREAMS)]
        during: list[httpx.Response] = []

        async def scenario() -> float:
            limits = httpx.Limits(max_connections=STREAMS + 10)
            async with httpx.AsyncClient(base_url=gw.base_url, timeout=120, limits=limits) as client:
                tasks = [asyncio.create_task(stream_chat(client, accounts[i % ACCOUNTS][1], 40, outcomes[i]))
                         for i in range(STREAMS)]
                await asyncio.gather(*(o.started.wait() for o in outcomes))
                persistent_redis.stop()  # every stream is mid-flight (40 tokens at 10/s: 4 s)
                # Past the 5 s auth cache: a new request meets the store's absence.
                await asyncio.sleep(5.5)
                during.append(await asyncio.to_thread(chat_once, gw, probe_key))
                persistent_redis.start()
                back = time.monotonic()
                while True:  # recovery by itself: no restart, no operator action
                    r = await asyncio.to_thread(chat_once, gw, probe_key)
                    if r.status_code == 200:
                        break
                    assert r.status_code == 503 and _openai_shape(r.json()), r.text
                    assert time.monotonic() - back < 60, "the gateway did not recover within 60 s"
                    await asyncio.sleep(0.2)
                recovered_s = time.monotonic() - back
                await asyncio.gather(*tasks)
                return recovered_s

        recovered_s = asyncio.run(scenario())
        assert during[0].status_code == 503, during[0].text
        assert _openai_shape(during[0].json()) and during[0].json()["error"]["code"] == "store_unavailable"
        assert during[0].headers["retry-after"]
        broken = [o.broken for o in outcomes if not o.clean]
        assert broken == [], broken
        succeeded = sum(o.succeeded for o in outcomes)
        assert succeeded > 0

        # The ledger: exactly one event per stream the clients saw succeed (settlements made while
        # Redis was away come from the outbox once it is back), never two for one lease.
        deadline = time.monotonic() + 60
        while True:
            events = ledger(persistent_redis.url, [acct for acct, _ in accounts])
            ok = sum(e.status == "ok" for e in events)
            if ok >= succeeded or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert ok == succeeded, Counter(e.status for e in events)
        assert len({e.lease_id for e in events}) == len(events)
        assert len(events) == sum(o.status == 200 for o in outcomes)
        health = httpx.get(f"{gw.base_url}/health", timeout=5).json()
        assert health["settlements_pending"] == 0
    print(f"redis restart: {succeeded}/{STREAMS} streams succeeded, recovered {recovered_s:.1f} s after restart")


@pytest.mark.slow
def test_one_of_two_gateways_killed_under_load(redis_url: str, tmp_path: Path) -> None:
    ttl_s = 1.5
    config = {"admission": {"lease_ttl_s": ttl_s, "queue_timeout_s": 0}}
    a = GatewayProcess(tmp_path / "a", redis_url=redis_url, config=config, extra_args=["--sim-tokens-per-s", "5"])
    b = GatewayProcess(tmp_path / "b", redis_url=redis_url, config=config, extra_args=["--sim-tokens-per-s", "50"])
    with a, b:
        account_id, key = a.new_key(["founder"] * 5)  # 10 sim-small slots
        on_a = [Outcome() for _ in range(10)]

        async def load() -> None:
            async with httpx.AsyncClient(base_url=a.base_url, timeout=60) as client:
                tasks = [asyncio.create_task(stream_chat(client, key, 40, o)) for o in on_a]
                await asyncio.gather(*(o.started.wait() for o in on_a))
                # Every slot is held by a stream on A: B refuses at once (queue_timeout 0).
                full = await asyncio.to_thread(chat_once, b, key)
                assert full.status_code == 429 and full.json()["error"]["code"] == "concurrency_limit"
                a.kill()
                await asyncio.gather(*tasks)

        asyncio.run(load())
        assert all(o.broken is not None or not o.done for o in on_a), "A died: no stream of it finished"
        killed_at = time.monotonic()
        # B keeps serving, and A's leases come back within the TTL: all 10 slots again.
        deadline = killed_at + ttl_s + 10
        while True:
            outcomes = [Outcome() for _ in range(10)]

            async def refill(outs: list[Outcome] = outcomes) -> None:
                async with httpx.AsyncClient(base_url=b.base_url, timeout=60) as client:
                    await asyncio.gather(*(stream_chat(client, key, 4, o) for o in outs))

            asyncio.run(refill())
            if all(o.succeeded for o in outcomes):
                break
            assert all(o.clean for o in outcomes)
            assert time.monotonic() < deadline, [o.error for o in outcomes if not o.succeeded]
            time.sleep(0.2)
        slots_back_s = time.monotonic() - killed_at

        # The sweep (B's, run here at the time it will run) bills every stream A was serving.
        async def sweep() -> list[dict[str, Any]]:
            settings = AdmissionSettings(lease_ttl_s=ttl_s)
            store = await RedisStore.connect(redis_url, request_unit=settings.weight_policy.unit)
            try:
                due = await store.now_ms() + settings.lease_ttl_ms + CHECKPOINT_GRACE_MS
                # B settles its own streams after their answers, dropping their checkpoints then: on a busy
                # machine some may still be in flight, and a sweep at this clock would take them for A's.
                for _ in range(600):
                    if len(await store.due_checkpoints(due)) <= len(on_a):
                        break
                    await asyncio.sleep(0.05)
                sweeper = AdmissionController(store, settings, {}, clock=lambda: due)
                assert await sweeper.settle_due_checkpoints() == len(on_a)
                return [{"status": e.status, "lease": e.lease_id, "completion_tokens": e.completion_tokens}
                        for e in await store.usage(account_id)]
            finally:
                await store.close()

        events = asyncio.run(sweep())
        interrupted = [e for e in events if e["status"] == "interrupted"]
        assert len(interrupted) == len(on_a)
        assert sum(e["status"] == "ok" for e in events) >= 10
        assert len({e["lease"] for e in events}) == len(events)
    print(f"two gateways: A's 10 slots back on B {slots_back_s:.1f} s after the kill (lease TTL {ttl_s} s)")
