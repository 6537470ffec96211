"""One contract for the console's records (cluster/observations.py), run against both stores.

Time is injected: heartbeats expire, refusals age out of the retention and
samples out of the window by moving a number, never by waiting. On Redis, two
store instances stand for two gateways: what one writes, the other reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence

import pytest

from cluster.embedded_store import EmbeddedStore
from cluster.observations import (
    Bounds,
    GatewayBeat,
    ModelRecent,
    ObservationSettings,
    RefusalEvent,
    Sample,
    SampleKind,
    model_summary,
    percentile,
)
from cluster.observations_memory import MemoryObservations
from cluster.records import Account
from cluster.store import Store
from policies.plans import PlanKind
from serve_apps.gateway.recent import RecentWindow

T0 = 1_800_000_000_000
TTL = 15_000
BOUNDS = Bounds(window_ms=600_000, bucket_ms=60_000, retention_ms=3_600_000, per_account=5, per_model=4)
UNIT = 340_000_000


class Pair:
    """Two handles on one store: one per gateway (the embedded store serves one process: the same object)."""

    def __init__(self, a: Store, b: Store) -> None:
        self.a, self.b = a, b


@pytest.fixture(params=["embedded", "redis"])
async def pair(request: pytest.FixtureRequest) -> AsyncIterator[Pair]:
    if request.param == "embedded":
        store = EmbeddedStore(None, request_unit=UNIT, clock=lambda: T0)
        yield Pair(store, store)
        await store.close()
        return
    from cluster.redis_store import RedisStore

    url = request.getfixturevalue("redis_url")
    a = await RedisStore.connect(url, request_unit=UNIT)
    b = await RedisStore.connect(url, request_unit=UNIT)
    yield Pair(a, b)
    await a.close()
    await b.close()


def beat(gateway_id: str, started: int, in_flight: int = 0) -> GatewayBeat:
    return GatewayBeat(gateway_id, started, "0.1.0", f"10.0.0.1:{8000 + started % 10}", in_flight)


async def test_a_gateway_is_live_until_its_heartbeat_ttl_passes(pair: Pair) -> None:
    written = await pair.a.observations.beat(beat("gw-a", T0 - 2), TTL, now_ms=T0)
    assert (written.seen_ms, written.expires_ms) == (T0, T0 + TTL)
    await pair.b.observations.beat(beat("gw-b", T0 - 1, in_flight=3), TTL, now_ms=T0 + 5_000)
    live = await pair.a.observations.gateways(now_ms=T0 + TTL - 1)
    assert [(g.gateway_id, g.in_flight, g.address) for g in live] == [("gw-a", 0, "10.0.0.1:8008"),
                                                                     ("gw-b", 3, "10.0.0.1:8009")]
    assert live[0].version == "0.1.0" and live[0].started_ms == T0 - 2
    # gw-a beats again with a new load; gw-b (killed) does not: it is gone when its TTL passes.
    await pair.a.observations.beat(beat("gw-a", T0 - 2, in_flight=7), TTL, now_ms=T0 + 10_000)
    live = await pair.b.observations.gateways(now_ms=T0 + 5_000 + TTL)
    assert [(g.gateway_id, g.in_flight, g.seen_ms) for g in live] == [("gw-a", 7, T0 + 10_000)]
    assert await pair.b.observations.gateways(now_ms=T0 + 10_000 + TTL) == []
    # A clean stop leaves at once.
    await pair.a.observations.beat(beat("gw-c", T0), TTL, now_ms=T0 + 20_000)
    await pair.a.observations.gateway_gone("gw-c")
    assert await pair.b.observations.gateways(now_ms=T0 + 20_001) == []


def refusal(ts: int, account: str, reason: str = "request_bar_empty", model: str = "m/large") -> RefusalEvent:
    return RefusalEvent(ts, account, f"key_{account}", model, reason, 429)


async def test_an_accounts_refusals_are_bounded_newest_first_and_kept_for_the_retention(pair: Pair) -> None:
    await pair.a.observations.record([refusal(T0 + i, "acct_a") for i in range(3)] + [refusal(T0, "acct_b")], [],
                                     BOUNDS)
    # The other gateway's batch, written later but holding older and newer events.
    await pair.b.observations.record([refusal(T0 - 10, "acct_a", "concurrency_limit"),
                                      refusal(T0 + 50, "acct_a", "key_request_cap_reached")], [], BOUNDS)
    rows = await pair.b.observations.account_refusals("acct_a", since_ms=T0 - BOUNDS.retention_ms, limit=50)
    assert [r.ts_ms for r in rows] == [T0 + 50, T0 + 2, T0 + 1, T0, T0 - 10]
    assert rows[0].to_json() == {"ts_ms": T0 + 50, "key_id": "key_acct_a", "model": "m/large",
                                 "reason": "key_request_cap_reached", "status": 429}
    assert [r.ts_ms for r in await pair.a.observations.account_refusals("acct_a", T0 - 5, limit=2)] == [T0 + 50,
                                                                                                          T0 + 2]
    # Past the retention (the reader's since): gone; past the cap per account: the oldest go.
    assert await pair.a.observations.account_refusals("acct_a", since_ms=T0 + 51, limit=50) == []
    await pair.a.observations.record([refusal(T0 + 100, "acct_a")], [], BOUNDS)
    rows = await pair.a.observations.account_refusals("acct_a", since_ms=0, limit=50)
    assert sorted(r.ts_ms for r in rows) == [T0 - 10, T0 + 1, T0 + 2, T0 + 50, T0 + 100], "the first written went"
    assert [r.account_id for r in await pair.a.observations.account_refusals("acct_b", 0, 50)] == ["acct_b"]


async def test_deleting_an_account_forgets_its_refusals(pair: Pair) -> None:
    account = await pair.a.create_account(Account("acct_gone", "t", PlanKind.SUBSCRIPTION, ("standard",),
                                                  created_ms=T0))
    await pair.a.observations.record([refusal(T0, account.id)], [], BOUNDS)
    assert await pair.a.delete_account(account.id)
    assert await pair.b.observations.account_refusals(account.id, 0, 50) == []


async def test_model_samples_and_refusal_counts_cover_the_window(pair: Pair) -> None:
    old = T0 - BOUNDS.window_ms - BOUNDS.bucket_ms
    await pair.a.observations.record(
        [refusal(old, "acct_a", "concurrency_limit"), refusal(T0, "acct_a"), refusal(T0 + 1, "acct_b")],
        [Sample(old, "m/large", SampleKind.TTFT, 9_999), Sample(T0, "m/large", SampleKind.WAIT, 5),
         Sample(T0, "m/large", SampleKind.TTFT, 100), Sample(T0 + 1, "m/small", SampleKind.TTFT, 40)], BOUNDS)
    await pair.b.observations.record(
        [refusal(T0 + 2, "acct_c", "overloaded", "m/small")],
        [Sample(T0 + 2, "m/large", SampleKind.TTFT, t) for t in (300, 200, 400)], BOUNDS)
    now = T0 + 10
    recent = await pair.b.observations.recent(now - BOUNDS.window_ms, now, BOUNDS)
    # The capped list keeps the newest 4 TTFT samples of m/large; the old one is outside the window anyway.
    assert recent["m/large"] == ModelRecent((5,), (100, 300, 200, 400), {"request_bar_empty": 2})
    assert recent["m/small"] == ModelRecent((), (40,), {"overloaded": 1})
    summary = model_summary(recent)["m/large"]
    assert (summary["ttft_p50_ms"], summary["ttft_p95_ms"], summary["wait_p50_ms"], summary["served"]) == (
        200, 400, 5, 4)
    # Ten minutes on, everything is outside the window.
    later = T0 + BOUNDS.window_ms + BOUNDS.bucket_ms
    assert await pair.a.observations.recent(later - BOUNDS.window_ms, later, BOUNDS) == {}


async def test_a_gateway_writes_its_events_in_one_batch_that_another_gateway_reads(pair: Pair) -> None:
    now = [T0]
    settings = ObservationSettings(flush_interval_s=60)  # nothing leaves the buffer unless flushed
    here = RecentWindow(lambda: now[0], pair.a.observations, settings)
    there = RecentWindow(lambda: now[0], pair.b.observations, settings)
    here.refused("acct_a", "key_1", "m/large", "key_request_cap_reached", 429)
    here.waited("m/large", 12)
    here.first_token("m/large", 250)
    if pair.a is not pair.b:
        assert await there.account_refusals("acct_a") == [], "buffered until flushed"
    await here.flush()
    assert [r["reason"] for r in await there.account_refusals("acct_a")] == ["key_request_cap_reached"]
    summary = (await there.model_summary())["m/large"]
    assert (summary["wait_p50_ms"], summary["ttft_p95_ms"], summary["refusals"]) == (
        12, 250, {"key_request_cap_reached": 1})
    now[0] += settings.refusal_retention_s * 1000 + 1
    assert await there.account_refusals("acct_a") == [] and await there.model_summary() == {}
    await here.close()
    await there.close()


class CountingObservations(MemoryObservations):
    def __init__(self) -> None:
        super().__init__(lambda: T0)
        self.batches: list[int] = []

    async def record(self, refusals: Sequence[RefusalEvent], samples: Sequence[Sample], bounds: Bounds) -> None:
        self.batches.append(len(refusals) + len(samples))
        await super().record(refusals, samples, bounds)


async def test_the_request_path_only_buffers_and_one_batch_carries_many_requests() -> None:
    store = CountingObservations()
    recent = RecentWindow(lambda: T0, store, ObservationSettings(flush_interval_s=0))
    for i in range(10):  # ten requests answered in the same turn of the event loop
        recent.waited("m/large", i)
        recent.first_token("m/large", 100 + i)
    recent.refused("acct_a", "key_1", "m/large", "concurrency_limit", 429)
    assert store.batches == [], "nothing is written on the request's path"
    await asyncio.sleep(0)  # one turn of the loop: the flush task runs
    assert store.batches == [21]
    await recent.close()
    assert store.batches == [21]


def test_percentile_is_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([7], 95) == 7
    assert percentile([5, 1, 4, 2, 3], 50) == 3
    assert percentile(list(range(1, 101)), 95) == 95
    assert percentile(list(range(1, 101)), 0) == 1


def test_settings_refuse_a_ttl_shorter_than_the_interval() -> None:
    with pytest.raises(ValueError, match="heartbeat_ttl_s"):
        ObservationSettings(heartbeat_interval_s=5, heartbeat_ttl_s=5)
    assert ObservationSettings().bounds().window_ms == 600_000
