"""Redis-specific behaviour of RedisStore (the shared behaviour is in test_store_contract.py).

Every test runs against a redis-server started by tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any

import pytest
from redis.asyncio import ConnectionPool, Redis

from cluster.records import Account, ApiKey, UsageEvent
from cluster.redis_store import RedisStore, describe_redis_url
from cluster.store import (
    Admitted,
    Lease,
    NotFound,
    Refused,
    ReserveOutcome,
    ReserveRequest,
    Settlement,
    SlotBusy,
    StoreError,
)
from policies.admission import Reason
from policies.bars import BarState
from policies.plans import PackKind, PlanKind, SizeClass
from policies.pricing import WeightPolicy
from policies.units import DAY_MS, PICO_PER_DOLLAR
from tests.conftest import RedisServer, free_port

UNIT = WeightPolicy().unit
MODEL = "qwen-coder"
T0 = 1_750_000_000_000  # a fixed, injected "now"
_ids = itertools.count()


def new_id(kind: str) -> str:
    return f"{kind}-{next(_ids)}"


def standard_account(account_id: str = "acct-1", **changes: Any) -> Account:
    return replace(Account(account_id, "Ada", PlanKind.SUBSCRIPTION, (PackKind.STANDARD,), created_ms=T0), **changes)


def request(
    account_id: str = "acct-1",
    *,
    weight: int = UNIT,
    waiter: str | None = None,
    lease_ttl_ms: int = 60_000,
    lease_id: str | None = None,
) -> ReserveRequest:
    return ReserveRequest(
        account_id,
        MODEL,
        SizeClass.STANDARD,
        weight,
        lease_id or new_id("lease"),
        lease_ttl_ms,
        waiter_id=waiter,
        waiter_ttl_ms=60_000 if waiter else 0,
    )


def settlement(lease: Lease, *, cost_pico: int = 0, refund: int = 0, ts_ms: int = T0) -> Settlement:
    event = UsageEvent(
        ts_ms,
        lease.account_id,
        "key-1",
        lease.model,
        100,
        0,
        10,
        lease.weight_units - refund,
        cost_pico,
        "ok",
        5,
        50,
        lease.lease_id,
    )
    return Settlement(lease, cost_pico, refund, event, retention_ms=14 * DAY_MS)


StoreFactory = Callable[[], Awaitable[RedisStore]]


@pytest.fixture
async def stores(redis_url: str) -> AsyncIterator[StoreFactory]:
    """Open as many independent stores (separate connection pools) as a test wants."""
    opened: list[RedisStore] = []

    async def make() -> RedisStore:
        store = await RedisStore.connect(redis_url, request_unit=UNIT)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def raw(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


async def all_keys(raw: Redis) -> set[str]:
    return {_text(k) for k in await raw.keys("*")}


def admitted(outcome: ReserveOutcome) -> Admitted:
    assert isinstance(outcome, Admitted), outcome
    return outcome


# -- atomicity across clients ----------------------------------------------


@pytest.mark.slow
async def test_200_queued_reserves_from_8_clients_never_share_a_slot(stores: StoreFactory, raw: Redis) -> None:
    pool = [await stores() for _ in range(8)]
    await pool[0].create_account(standard_account())
    lease_key = "packserve:{acct-1}:lease:" + MODEL
    holders = 0
    max_holders = 0
    max_zcard = 0
    done = asyncio.Event()

    async def probe() -> None:
        nonlocal max_zcard
        while not done.is_set():
            max_zcard = max(max_zcard, await raw.zcard(lease_key))
            await asyncio.sleep(0)

    async def one(store: RedisStore) -> None:
        nonlocal holders, max_holders
        waiter_id = new_id("wait")
        waiter = store.slot_waiter("acct-1", MODEL)
        try:
            while True:
                outcome = await store.reserve(request(waiter=waiter_id))
                if isinstance(outcome, Admitted):
                    break
                assert isinstance(outcome, SlotBusy) and outcome.position >= 0, outcome
                await waiter.wait(2.0)
        finally:
            waiter.close()
        holders += 1
        max_holders = max(max_holders, holders)
        max_zcard_now = await raw.zcard(lease_key)
        assert max_zcard_now <= 1
        await asyncio.sleep(0)
        holders -= 1
        await store.settle(settlement(outcome.lease))

    prober = asyncio.create_task(probe())
    await asyncio.wait_for(asyncio.gather(*(one(pool[i % 8]) for i in range(200))), timeout=120)
    done.set()
    await prober
    assert max_holders == 1
    assert max_zcard <= 1
    snap = await pool[0].snapshot("acct-1")
    assert snap.request is not None and snap.request_spec is not None
    assert snap.request.level == snap.request_spec.capacity - 200 * UNIT
    assert len(await pool[0].usage("acct-1")) == 200
    assert await raw.zcard("packserve:{acct-1}:queue:" + MODEL) == 0


async def test_200_reserves_from_8_clients_never_overspend_the_request_bar(stores: StoreFactory) -> None:
    pool = [await stores() for _ in range(8)]
    await pool[0].create_account(standard_account())
    heavy = 100 * UNIT  # a full bar (500 requests) holds exactly 5 of these
    outcomes: list[ReserveOutcome] = []

    async def one(store: RedisStore) -> None:
        while True:
            outcome = await store.reserve(request(weight=heavy))
            if not isinstance(outcome, SlotBusy):
                break
            await asyncio.sleep(0.001)
        outcomes.append(outcome)
        if isinstance(outcome, Admitted):
            assert outcome.snapshot.request is not None and outcome.snapshot.request.level >= 0
            await store.settle(settlement(outcome.lease))

    await asyncio.wait_for(asyncio.gather(*(one(pool[i % 8]) for i in range(200))), timeout=120)
    wins = [o for o in outcomes if isinstance(o, Admitted)]
    refusals = [o for o in outcomes if isinstance(o, Refused)]
    assert len(wins) == 5
    assert len(refusals) == 195 and {r.reason for r in refusals} == {Reason.REQUEST_BAR_EMPTY}
    # The headers' remaining amounts come from each admission's own snapshot: all different.
    assert sorted(w.snapshot.request.level for w in wins if w.snapshot.request) == [
        0,
        100 * UNIT,
        200 * UNIT,
        300 * UNIT,
        400 * UNIT,
    ]
    snap = await pool[0].snapshot("acct-1")
    assert snap.request is not None and snap.request.level == 0


# -- one round trip ------------------------------------------------------------


async def _commands_during(raw: Redis, action: Callable[[], Awaitable[object]]) -> list[str]:
    """Commands that reached the server from clients while `action` ran (MONITOR; script-internal ones excluded)."""
    marker = new_id("marker")
    seen: list[str] = []
    await raw.ping()  # open raw's connection now, so the marker below sends no HELLO
    watcher = Redis(connection_pool=ConnectionPool(**raw.connection_pool.connection_kwargs))
    async with watcher, watcher.monitor() as monitor:

        async def collect() -> None:
            while True:
                info = await monitor.next_command()
                if info["client_type"] == "lua":
                    continue
                if info["command"] == f"ECHO {marker}":
                    return
                seen.append(info["command"].split(" ", 1)[0].upper())

        collector = asyncio.create_task(collect())
        await action()
        await raw.echo(marker)
        await asyncio.wait_for(collector, 5)
    return seen


async def test_reserve_and_settle_are_one_command_each(stores: StoreFactory, raw: Redis) -> None:
    store = await stores()
    await store.create_account(standard_account())
    await store.snapshot("acct-1")  # warm the connection pool

    outcomes: list[ReserveOutcome] = []

    async def reserve() -> None:
        outcomes.append(await store.reserve(request()))

    assert await _commands_during(raw, reserve) == ["EVALSHA"]
    lease = admitted(outcomes[0]).lease

    async def busy() -> None:
        outcomes.append(await store.reserve(request(waiter="w-1")))

    assert await _commands_during(raw, busy) == ["EVALSHA"]
    assert isinstance(outcomes[1], SlotBusy)
    assert await _commands_during(raw, lambda: store.settle(settlement(lease))) == ["EVALSHA"]
    assert await _commands_during(raw, lambda: store.snapshot("acct-1")) == ["EVALSHA"]


async def test_scripts_are_reloaded_after_script_flush(stores: StoreFactory, raw: Redis) -> None:
    store = await stores()
    await store.create_account(standard_account())
    await raw.script_flush()
    admitted(await store.reserve(request()))


# -- time ------------------------------------------------------------------------


async def test_time_comes_from_redis_when_not_injected(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    wall = time.time() * 1000
    outcome = admitted(await store.reserve(request(lease_ttl_ms=30_000)))
    assert abs(outcome.snapshot.now_ms - wall) < 5_000
    assert outcome.lease.expires_ms == outcome.lease.admitted_ms + 30_000
    assert abs(await store.now_ms() - wall) < 5_000


# -- idempotency -----------------------------------------------------------------


async def test_settle_retried_after_a_hiccup_charges_and_records_once(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    lease = admitted(await store.reserve(request(), now_ms=T0)).lease
    s = settlement(lease, cost_pico=2 * PICO_PER_DOLLAR, refund=UNIT)
    first = await store.settle(s, now_ms=T0 + 1_000)
    second = await store.settle(s, now_ms=T0 + 1_000)
    assert first is not None and second is not None
    assert first.weekly == second.weekly
    assert first.weekly is not None and first.weekly.level == 22 * PICO_PER_DOLLAR
    assert first.request == second.request
    assert first.request is not None and first.request_spec is not None
    assert first.request.level == first.request_spec.capacity  # refunded once, never above capacity
    assert len(await store.usage("acct-1")) == 1


async def test_reserve_retried_with_the_same_lease_id_charges_once(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    r = request()
    one = admitted(await store.reserve(r, now_ms=T0))
    two = admitted(await store.reserve(r, now_ms=T0 + 5))
    assert one.lease.expires_ms == two.lease.expires_ms
    assert one.snapshot.request == two.snapshot.request
    assert await store.active_leases("acct-1", MODEL, now_ms=T0 + 5) == 1


# -- wake-ups --------------------------------------------------------------------


async def test_settle_on_another_client_wakes_a_queued_waiter(stores: StoreFactory) -> None:
    holder, queued = await stores(), await stores()
    await holder.create_account(standard_account())
    lease = admitted(await holder.reserve(request())).lease

    waiter = queued.slot_waiter("acct-1", MODEL)
    try:
        busy = await queued.reserve(request(waiter="w-1"))
        assert isinstance(busy, SlotBusy) and busy.position == 0 and busy.wake_at_ms == lease.expires_ms
        assert await waiter.wait(0.1) is False  # nothing freed yet
        started = time.monotonic()
        await holder.settle(settlement(lease))
        assert await waiter.wait(5.0) is True
        assert time.monotonic() - started < 1.0
    finally:
        waiter.close()
    admitted(await queued.reserve(request(waiter="w-1")))


async def test_leaving_the_queue_wakes_the_next_waiter(stores: StoreFactory) -> None:
    a, b = await stores(), await stores()
    await a.create_account(standard_account())
    admitted(await a.reserve(request()))
    assert isinstance(await a.reserve(request(waiter="first")), SlotBusy)
    waiter = b.slot_waiter("acct-1", MODEL)
    try:
        second = await b.reserve(request(waiter="second"))
        assert isinstance(second, SlotBusy) and second.position == 1
        await a.leave_queue("acct-1", MODEL, "first")
        assert await waiter.wait(5.0) is True
    finally:
        waiter.close()
    again = await b.reserve(request(waiter="second"))
    assert isinstance(again, SlotBusy) and again.position == 0


async def test_wake_ups_resume_after_a_redis_restart(persistent_redis: RedisServer) -> None:
    holder = await RedisStore.connect(persistent_redis.url, request_unit=UNIT)
    queued = await RedisStore.connect(persistent_redis.url, request_unit=UNIT)
    waiter = queued.slot_waiter("acct-1", MODEL)
    try:
        await holder.create_account(standard_account())
        lease = admitted(await holder.reserve(request())).lease
        assert isinstance(await queued.reserve(request(waiter="w-1")), SlotBusy)

        persistent_redis.restart()
        # Whatever was published while the listener was away is lost: it wakes everyone once.
        assert await waiter.wait(10.0) is True
        assert await waiter.wait(0.2) is False
        await holder.settle(settlement(lease))
        assert await waiter.wait(5.0) is True
        admitted(await queued.reserve(request(waiter="w-1")))
    finally:
        waiter.close()
        await holder.close()
        await queued.close()


async def test_close_stops_the_listener(redis_url: str) -> None:
    store = await RedisStore.connect(redis_url, request_unit=UNIT)
    waiter = store.slot_waiter("acct-1", MODEL)
    await asyncio.sleep(0.05)
    listeners = [t for t in asyncio.all_tasks() if t.get_name() == "packserve-redis-wake"]
    assert len(listeners) == 1
    waiter.close()
    await store.close()
    assert listeners[0].done()


# -- key schema ------------------------------------------------------------------


async def test_every_account_key_is_hash_tagged_and_deletion_removes_them_all(stores: StoreFactory, raw: Redis) -> None:
    store = await stores()
    await store.create_account(standard_account())
    await store.create_account(standard_account("acct-2"))
    await store.create_key(ApiKey("key-1", "acct-1", "a" * 64, "pk-aaaa", T0))
    await store.create_key(ApiKey("key-2", "acct-2", "b" * 64, "pk-bbbb", T0))
    lease = admitted(await store.reserve(request(), now_ms=T0)).lease
    assert isinstance(await store.reserve(request(waiter="w"), now_ms=T0), SlotBusy)
    await store.settle(settlement(lease), now_ms=T0 + 10)
    # FIFO: the freed slot goes to the queued waiter, not to a newcomer.
    assert isinstance(await store.reserve(request(), now_ms=T0 + 20), SlotBusy)
    admitted(await store.reserve(request(waiter="w"), now_ms=T0 + 20))

    keys = await all_keys(raw)
    global_keys = {"packserve:accounts", "packserve:keyhash", "packserve:keyid"}
    assert global_keys <= keys
    assert all("{acct-1}" in k or "{acct-2}" in k for k in keys - global_keys), keys

    assert await store.delete_account("acct-1") is True
    assert await store.delete_account("acct-1") is False
    left = await all_keys(raw)
    assert not [k for k in left if "{acct-1}" in k], left
    assert await raw.hkeys("packserve:keyid") == [b"key-2"]
    assert await store.find_key("a" * 64) is None
    assert await store.find_key("b" * 64) is not None
    # A late settlement of the deleted account's lease records nothing.
    assert await store.settle(settlement(lease)) is None
    assert not [k for k in await all_keys(raw) if "{acct-1}" in k]


async def test_integers_are_stored_as_plain_decimal_strings(stores: StoreFactory, raw: Redis) -> None:
    store = await stores()
    await store.create_account(standard_account(packs=(PackKind.FOUNDER,) * 5))
    lease = admitted(await store.reserve(request(), now_ms=T0)).lease
    await store.settle(settlement(lease, cost_pico=123_456_789_012_345), now_ms=T0 + 1)
    fields = {_text(k): _text(v) for k, v in (await raw.hgetall("packserve:{acct-1}:account")).items()}
    for name in ("rl", "ra", "wl", "wa", "created"):
        assert fields[name].lstrip("-").isdigit(), (name, fields[name])
    assert int(fields["wl"]) == 180 * PICO_PER_DOLLAR - 123_456_789_012_345


# -- persistence -----------------------------------------------------------------


async def test_everything_survives_a_redis_restart(persistent_redis: RedisServer) -> None:
    store = await RedisStore.connect(persistent_redis.url, request_unit=UNIT)
    try:
        await store.create_account(standard_account())
        await store.create_key(ApiKey("key-1", "acct-1", "c" * 64, "pk-cccc", T0))
        lease = admitted(await store.reserve(request(), now_ms=T0)).lease
        await store.settle(settlement(lease, cost_pico=PICO_PER_DOLLAR), now_ms=T0 + 100)
        before = await store.snapshot("acct-1", now_ms=T0 + 200)

        persistent_redis.restart()

        # The open store reconnects and reloads its scripts (the script cache is gone).
        assert await store.snapshot("acct-1", now_ms=T0 + 200) == before
    finally:
        await store.close()

    fresh = await RedisStore.connect(persistent_redis.url, request_unit=UNIT)
    try:
        assert await fresh.get_account("acct-1") == standard_account()
        key = await fresh.find_key("c" * 64)
        assert key is not None and key.id == "key-1"
        events = await fresh.usage("acct-1")
        assert [e.lease_id for e in events] == [lease.lease_id] and events[0].cost_pico == PICO_PER_DOLLAR
        assert await fresh.snapshot("acct-1", now_ms=T0 + 200) == before
    finally:
        await fresh.close()


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://localhost:6379", "must start with redis://"),
        ("localhost:6379", "must start with redis://"),
        ("redis://:6379/0", "no host"),
        ("redis://localhost:port/0", "invalid port"),
        ("redis://localhost:99999/0", "invalid port"),
        ("redis://localhost:6379/zero", "invalid database"),
        ("", "empty"),
    ],
)
async def test_a_malformed_url_is_a_clear_value_error(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        await RedisStore.connect(url, request_unit=UNIT)


def test_a_password_never_appears_in_url_errors() -> None:
    with pytest.raises(ValueError) as info:
        describe_redis_url("redis://user:s3cret@localhost:nope/0")
    assert "s3cret" not in str(info.value) and "***" in str(info.value)


async def test_unreachable_redis_is_a_store_error_naming_the_address() -> None:
    port = free_port()  # nothing listens there
    started = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot reach Redis at 127.0.0.1:{port}"):
        await RedisStore.connect(f"redis://127.0.0.1:{port}/0", request_unit=UNIT)
    assert time.monotonic() - started < 5


async def test_a_lost_server_gives_store_errors_not_redis_exceptions(tmp_path: Any) -> None:
    from tests.conftest import start_redis

    server = start_redis(tmp_path / "gone")
    store = await RedisStore.connect(server.url, request_unit=UNIT)
    try:
        await store.create_account(standard_account())
        server.stop()
        with pytest.raises(StoreError, match="cannot reach Redis"):
            await store.reserve(request())
        with pytest.raises(StoreError):
            await store.usage("acct-1")
        with pytest.raises(StoreError):
            await store.find_key("x")
    finally:
        await store.close()
        server.stop()


async def test_missing_accounts_raise_not_found(stores: StoreFactory) -> None:
    store = await stores()
    with pytest.raises(NotFound):
        await store.reserve(request("nobody"))
    with pytest.raises(NotFound):
        await store.snapshot("nobody")
    with pytest.raises(NotFound):
        await store.set_suspended("nobody", True)
    with pytest.raises(NotFound):
        await store.create_key(ApiKey("k", "nobody", "d" * 64, "pk", T0))


# -- usage stream ----------------------------------------------------------------


async def test_usage_is_in_event_time_order_even_when_settle_times_go_backwards(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    # Injected settle times that go backwards must still get growing stream ids.
    for ts, now in [(T0 + 300, T0 + 900), (T0 + 100, T0 + 200), (T0 + 200, T0 + 250)]:
        lease = admitted(await store.reserve(request(), now_ms=ts)).lease
        await store.settle(settlement(lease, ts_ms=ts), now_ms=now)
    assert [e.ts_ms for e in await store.usage("acct-1")] == [T0 + 100, T0 + 200, T0 + 300]
    assert [e.ts_ms for e in await store.usage("acct-1", T0 + 150, T0 + 300)] == [T0 + 200]
    # A gateway whose clock runs ahead of Redis: the event is still found from its own time.
    ahead = admitted(await store.reserve(request(), now_ms=T0 + 1_000)).lease
    await store.settle(settlement(ahead, ts_ms=T0 + 5_000), now_ms=T0 + 1_000)
    assert [e.lease_id for e in await store.usage("acct-1", T0 + 5_000)] == [ahead.lease_id]
    assert await store.purge_usage(T0 + 1) == 0  # every id is at or after its event time
    assert await store.purge_usage(T0 + 10_000) == 4
    assert await store.usage("acct-1") == []


async def test_usage_pages_through_long_streams(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account(packs=(PackKind.FOUNDER,) * 5))
    n = 1_234  # more than one XRANGE page
    for i in range(n):
        lease = admitted(await store.reserve(request(), now_ms=T0 + i)).lease
        await store.settle(settlement(lease, ts_ms=T0 + i), now_ms=T0 + i)
    events = await store.usage("acct-1")
    assert [e.ts_ms for e in events] == [T0 + i for i in range(n)]


# -- payg month and plan changes --------------------------------------------------------


async def test_payg_spend_cap_resets_at_the_utc_month_boundary(stores: StoreFactory) -> None:
    store = await stores()
    payg = Account("payg-1", "Bo", PlanKind.PAYG, spend_cap_pico=PICO_PER_DOLLAR, payg_concurrency=2)
    await store.create_account(payg)
    march_end = 1_711_929_600_000  # 2024-04-01T00:00:00Z
    lease = admitted(await store.reserve(request("payg-1"), now_ms=march_end - 60_000)).lease
    after = await store.settle(settlement(lease, cost_pico=PICO_PER_DOLLAR), now_ms=march_end - 50_000)
    assert after is not None and after.month_spend_pico == PICO_PER_DOLLAR
    refused = await store.reserve(request("payg-1"), now_ms=march_end - 40_000)
    assert isinstance(refused, Refused) and refused.reason is Reason.SPEND_CAP_REACHED
    assert refused.retry_after_ms == 40_000
    april = admitted(await store.reserve(request("payg-1"), now_ms=march_end))
    assert april.snapshot.month_spend_pico == 0


async def test_a_pack_change_keeps_each_bars_remaining_fraction(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account(packs=(PackKind.FOUNDER, PackKind.FOUNDER)))
    lease = admitted(await store.reserve(request(weight=100 * UNIT), now_ms=T0)).lease  # 1500 -> 1400
    await store.settle(settlement(lease), now_ms=T0)
    await store.set_plan("acct-1", PlanKind.SUBSCRIPTION, [PackKind.STANDARD], None, 4, now_ms=T0 + 1)
    snap = await store.snapshot("acct-1", now_ms=T0 + 1)
    shrunk = 1400 * UNIT * 500 // 1500  # 14/15 of the new capacity, rounded down: never a refill
    assert snap.request == BarState(shrunk, T0)
    assert snap.weekly == BarState(24 * PICO_PER_DOLLAR, None)  # was full, stays full
    admitted(await store.reserve(request(weight=100 * UNIT), now_ms=T0 + 2))
    await store.set_plan("acct-1", PlanKind.SUBSCRIPTION, [PackKind.FOUNDER], None, 4, now_ms=T0 + 3)
    grown = await store.snapshot("acct-1", now_ms=T0 + 3)
    assert grown.request == BarState((shrunk - 100 * UNIT) * 750 // 500, T0)  # the running interval is kept


# -- queue hygiene -----------------------------------------------------------------


async def test_a_dead_waiter_stops_blocking_after_its_ttl(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    lease = admitted(await store.reserve(request(lease_ttl_ms=1_000), now_ms=T0)).lease
    dead = replace(request(waiter="dead"), waiter_ttl_ms=5_000)
    assert isinstance(await store.reserve(dead, now_ms=T0), SlotBusy)
    await store.settle(settlement(lease), now_ms=T0 + 10)
    # The dead waiter never comes back; a newcomer is blocked only until its TTL.
    busy = await store.reserve(request(), now_ms=T0 + 4_999)
    assert isinstance(busy, SlotBusy) and busy.wake_at_ms is None and busy.position == -1
    admitted(await store.reserve(request(), now_ms=T0 + 5_000))


async def test_an_expired_lease_frees_its_slot_and_cannot_be_renewed(stores: StoreFactory) -> None:
    store = await stores()
    await store.create_account(standard_account())
    lease = admitted(await store.reserve(request(lease_ttl_ms=1_000), now_ms=T0)).lease
    assert await store.renew(lease, 1_000, now_ms=T0 + 999) is True  # now expires at T0 + 1999
    busy = await store.reserve(request(), now_ms=T0 + 1_998)
    assert isinstance(busy, SlotBusy) and busy.wake_at_ms == T0 + 1_999
    admitted(await store.reserve(request(), now_ms=T0 + 1_999))
    assert await store.renew(lease, 1_000, now_ms=T0 + 2_000) is False


async def test_an_injected_clock_replaces_redis_time(redis_url: str) -> None:
    now = [T0]
    store = await RedisStore.connect(redis_url, request_unit=UNIT, clock=lambda: now[0])
    try:
        await store.create_account(standard_account())
        outcome = admitted(await store.reserve(request(lease_ttl_ms=1_000)))
        assert outcome.lease.admitted_ms == T0 and await store.now_ms() == T0
        now[0] += 1_000
        assert await store.active_leases("acct-1", MODEL) == 0
    finally:
        await store.close()



async def test_auth_failures_are_counted_across_gateways(redis_url: str) -> None:
    """Two gateways (two connections, as two processes hold) count one source's failures together."""
    a = await RedisStore.connect(redis_url, request_unit=UNIT)
    b = await RedisStore.connect(redis_url, request_unit=UNIT)
    now = 1_800_000_000_000
    try:
        verdicts = [await store.record_auth_failure("203.0.113.9", 4, 60_000, now) for store in (a, b, a, b, a)]
        assert [(v.failures, v.refused) for v in verdicts] == [(1, False), (2, False), (3, False), (4, False),
                                                               (5, True)]
        # Idle sources cost nothing: the key expires two windows after the last failure.
        ttl = await a._client.pttl("packserve:authfail:203.0.113.9")
        assert 0 < ttl <= 120_000
    finally:
        await a.close()
        await b.close()


async def test_more_concurrent_commands_than_connections_wait_for_one(redis_url: str) -> None:
    # redis-py's default pool refused the 101st concurrent command ("Too many connections"): under
    # 1,000 streams (bench/soak.py) a gateway answered 503 store_unavailable with Redis idle.
    store = RedisStore(redis_url, request_unit=UNIT, max_connections=4)
    try:
        await store.load_scripts()
        await store.create_account(standard_account("acct-pool"))
        snapshots = await asyncio.gather(*(store.snapshot("acct-pool") for _ in range(300)))
        assert [s.account.id for s in snapshots] == ["acct-pool"] * 300
    finally:
        await store.close()
