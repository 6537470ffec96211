"""One contract, run against every store: the embedded store and Redis.

Time is injected (a fake clock in ms), so 5-hour and weekly bars are tested
in milliseconds. Queue waits use real (short) event waits, never a sleep to
reach a window boundary.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from decimal import Decimal

import msgpack
import pytest

from cluster.accounts import Accounts
from cluster.controller import CHECKPOINT_GRACE_MS, AdmissionController, AdmissionRefused, Progress, Ticket
from cluster.embedded_store import EmbeddedStore
from cluster.records import Account, UsageEvent
from cluster.retention import purge_once
from cluster.scheduler import Overloaded, Scheduler
from cluster.settings import AdmissionSettings, SchedulerSettings
from cluster.store import (
    CapacityGone,
    CapacityGranted,
    CapacityOutcome,
    CapacityTerms,
    CapacityWaiting,
    NotFound,
    Settlement,
    Store,
    StoreError,
)
from policies.admission import Reason
from policies.fairness import SchedulerMode, counter_units, service_units
from policies.plans import SizeClass
from policies.pricing import ModelPrice, UsageError
from policies.units import HOUR_MS, MINUTE_MS, PICO_PER_DOLLAR

LARGE = "hf:test/large-3.40"
SMALL = "hf:test/small-2.00"
EMBED = "hf:test/embed"
PRICES = {
    LARGE: ModelPrice(1_200_000, 3_400_000, SizeClass.STANDARD),
    SMALL: ModelPrice(300_000, 2_000_000, SizeClass.SMALL),
    "hf:test/standard-2.00": ModelPrice(300_000, 2_000_000, SizeClass.STANDARD),
    EMBED: ModelPrice(0, 0, SizeClass.UNMETERED),
}
T0 = 1_800_000_000_000  # a fixed epoch-ms start; any value works


class FakeClock:
    def __init__(self, now: int = T0) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class Harness:
    def __init__(self, store: Store, clock: FakeClock, settings: AdmissionSettings) -> None:
        self.store = store
        self.clock = clock
        self.accounts = Accounts(store, clock)
        self.ctl = AdmissionController(store, settings, PRICES, clock=clock)

    async def account(self, packs: list[str] | None = None, plan: str = "subscription", **kw: object) -> Account:
        return await self.accounts.create("test", plan, packs if plan == "subscription" else None, **kw)  # type: ignore[arg-type]

    async def one(self, account: Account, model: str = LARGE, *, prompt: int = 10, cached: int = 0,
                  completion: int = 10, status: str = "ok") -> Ticket:
        ticket = await self.ctl.reserve(account, "key_test", model, queue_timeout_s=0)
        await self.ctl.settle(ticket, prompt_tokens=prompt, cached_tokens=cached, completion_tokens=completion,
                              status=status, first_token=status == "ok", ttft_ms=1)
        return ticket

    async def burst(self, account: Account, n: int, model: str = LARGE) -> tuple[int, AdmissionRefused | None]:
        ok = 0
        for _ in range(n):
            try:
                await self.one(account, model, prompt=0, completion=0)
            except AdmissionRefused as refused:
                return ok, refused
            ok += 1
        return ok, None

    async def requests_left(self, account: Account) -> float:
        snap = await self.ctl.snapshot(account.id)
        assert snap.request is not None
        return snap.request.level / self.ctl.policy.unit


@pytest.fixture(params=["embedded", "redis"])
async def h(request: pytest.FixtureRequest, tmp_path: object) -> AsyncIterator[Harness]:
    clock = FakeClock()
    settings = AdmissionSettings(queue_timeout_s=5, lease_ttl_s=30)
    unit = settings.weight_policy.unit
    store: Store
    if request.param == "embedded":
        store = EmbeddedStore(None, request_unit=unit, clock=clock)
    else:
        from cluster.redis_store import RedisStore

        url = request.getfixturevalue("redis_url")
        store = await RedisStore.connect(url, request_unit=unit)
    harness = Harness(store, clock, settings)
    yield harness
    await harness.ctl.drain()
    await store.close()


# -- SPEC §1 worked examples ---------------------------------------------------

async def test_standard_pack_burst_then_one_tick(h: Harness) -> None:
    acct = await h.account(["standard"])
    ok, refused = await h.burst(acct, 501)
    assert ok == 500
    assert refused is not None and refused.reason is Reason.REQUEST_BAR_EMPTY
    assert refused.retry_after_s is not None and 0 < refused.retry_after_s <= 180
    h.clock.advance(3 * MINUTE_MS)
    ok, refused = await h.burst(acct, 26)
    assert ok == 25
    assert refused is not None and refused.reason is Reason.REQUEST_BAR_EMPTY


async def test_two_dollar_model_fits_850_exactly(h: Harness) -> None:
    acct = await h.account(["standard"])
    ok, refused = await h.burst(acct, 851, "hf:test/standard-2.00")
    assert ok == 850
    assert refused is not None and refused.reason is Reason.REQUEST_BAR_EMPTY
    assert await h.requests_left(acct) == 0


async def test_two_founder_packs_capacities_and_concurrency(h: Harness) -> None:
    acct = await h.account(["founder", "founder"])
    snap = await h.ctl.snapshot(acct.id)
    assert snap.request_spec is not None and snap.weekly_spec is not None
    assert snap.request_spec.capacity == 1500 * h.ctl.policy.unit
    assert snap.weekly_spec.capacity == 72 * PICO_PER_DOLLAR
    held = [await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0) for _ in range(2)]
    with pytest.raises(AdmissionRefused) as exc:
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert exc.value.reason is Reason.CONCURRENCY_LIMIT
    small = [await h.ctl.reserve(acct, "k", SMALL, queue_timeout_s=0) for _ in range(4)]
    with pytest.raises(AdmissionRefused):
        await h.ctl.reserve(acct, "k", SMALL, queue_timeout_s=0)
    for t in held + small:
        await h.ctl.settle(t, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                           first_token=True, ttft_ms=None)


async def test_founder_weekly_bar_from_zero(h: Harness) -> None:
    acct = await h.account(["founder"])
    # 30M input tokens at $1.20/M is exactly $36: the weekly bar lands on 0.
    await h.one(acct, LARGE, prompt=30_000_000, completion=0)
    snap = await h.ctl.snapshot(acct.id)
    assert snap.weekly is not None and snap.weekly.level == 0
    with pytest.raises(AdmissionRefused) as exc:
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert exc.value.reason is Reason.WEEKLY_TOKENS_EXHAUSTED
    assert exc.value.retry_after_s == 3 * 3600
    h.clock.advance(3 * HOUR_MS)
    snap = await h.ctl.snapshot(acct.id)
    assert snap.weekly is not None and snap.weekly.level == Decimal("0.72") * PICO_PER_DOLLAR
    h.clock.advance(147 * HOUR_MS)
    snap = await h.ctl.snapshot(acct.id)
    assert snap.weekly is not None and snap.weekly.level == 36 * PICO_PER_DOLLAR
    assert snap.weekly.anchor_ms is None


# -- settlement ---------------------------------------------------------------

async def test_token_cost_with_cache_discount_recorded(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.one(acct, LARGE, prompt=2_000_000, cached=1_000_000, completion=1_000_000)
    events = await h.store.usage(acct.id)
    assert len(events) == 1
    # 1M uncached × $1.20 + 1M cached × $1.20 × 0.2 + 1M × $3.40 = $4.84
    assert events[0].cost_pico == 4_840_000 * 1_000_000
    assert (events[0].prompt_tokens, events[0].cached_tokens, events[0].completion_tokens) == (
        2_000_000, 1_000_000, 1_000_000)
    snap = await h.ctl.snapshot(acct.id)
    assert snap.weekly is not None and snap.weekly.level == (24 - Decimal("4.84")) * PICO_PER_DOLLAR


async def test_payg_pays_list_price_and_hits_spend_cap(h: Harness) -> None:
    acct = await h.account(plan="payg", spend_cap_usd="5", concurrency=2)
    await h.one(acct, LARGE, prompt=2_000_000, cached=1_000_000, completion=1_000_000)
    events = await h.store.usage(acct.id)
    assert events[0].cost_pico == 5_800_000 * 1_000_000  # no cache discount: $2.40 + $3.40 = $5.80 > cap
    with pytest.raises(AdmissionRefused) as exc:
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert exc.value.reason is Reason.SPEND_CAP_REACHED
    assert exc.value.retry_after_s is not None and exc.value.retry_after_s > 0


async def test_failure_before_first_token_is_refunded(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.one(acct, LARGE, prompt=0, completion=0, status="error")
    assert await h.requests_left(acct) == 500
    events = await h.store.usage(acct.id)
    assert [e.status for e in events] == ["refunded"]
    await h.one(acct, LARGE, prompt=0, completion=0, status="ok")
    assert await h.requests_left(acct) == 499


async def test_unmetered_model_costs_nothing_even_when_bars_are_empty(h: Harness) -> None:
    acct = await h.account(["standard"])
    ok, _ = await h.burst(acct, 500)
    assert ok == 500
    await h.one(acct, EMBED, prompt=1000, completion=0)
    events = await h.store.usage(acct.id)
    assert events[-1].cost_pico == 0 and events[-1].weight_units == 0
    assert await h.requests_left(acct) == 0


async def test_settle_twice_is_refused_and_snapshot_headers_match(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert ticket.snapshot.request is not None
    assert ticket.snapshot.request.level == 499 * h.ctl.policy.unit
    await h.ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                       first_token=True, ttft_ms=1)
    with pytest.raises(RuntimeError):
        h.ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                     first_token=True, ttft_ms=1)


# -- concurrency and queueing ---------------------------------------------------

async def test_queue_is_fifo_and_wakes_on_release(h: Harness) -> None:
    acct = await h.account(["standard"])
    first = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    order: list[str] = []

    async def waiter(name: str) -> Ticket:
        ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=5)
        order.append(name)
        return ticket

    b = asyncio.create_task(waiter("b"))
    await asyncio.sleep(0.05)
    c = asyncio.create_task(waiter("c"))
    await asyncio.sleep(0.05)
    assert order == []
    assert h.ctl.queue.depth == 2
    left_before = await h.requests_left(acct)
    assert left_before == 499  # queued requests are not charged
    await h.ctl.settle(first, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                       first_token=True, ttft_ms=None)
    tb = await asyncio.wait_for(b, 2)
    assert order == ["b"]
    assert not c.done()
    await h.ctl.settle(tb, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                       first_token=True, ttft_ms=None)
    tc = await asyncio.wait_for(c, 2)
    assert order == ["b", "c"]
    await h.ctl.settle(tc, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                       first_token=True, ttft_ms=None)
    assert await h.requests_left(acct) == 497


async def test_queue_timeout_refuses_and_charges_nothing(h: Harness) -> None:
    acct = await h.account(["standard"])
    held = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    with pytest.raises(AdmissionRefused) as exc:
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0.2)
    assert exc.value.reason is Reason.CONCURRENCY_LIMIT
    assert exc.value.retry_after_s is not None and exc.value.retry_after_s >= 1
    assert await h.requests_left(acct) == 499
    assert h.ctl.queue.depth == 0
    await h.ctl.settle(held, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status="ok",
                       first_token=True, ttft_ms=None)
    # The timed-out waiter left the queue: a newcomer is admitted at once.
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert ticket.lease.lease_id


async def test_crashed_holder_lease_expires(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)  # never settled: the holder "crashed"
    with pytest.raises(AdmissionRefused):
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    h.clock.advance(31_000)
    assert await h.store.active_leases(acct.id, LARGE, h.clock.now) == 0
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    assert ticket.lease.expires_ms == h.clock.now + 30_000


async def test_renewed_lease_does_not_expire(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    h.clock.advance(20_000)
    assert await h.ctl.renew(ticket)
    h.clock.advance(20_000)
    with pytest.raises(AdmissionRefused):
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    h.clock.advance(11_000)
    assert not await h.ctl.renew(ticket)  # expired: renewal cannot resurrect it


# -- checkpoints: usage a dead gateway owed -------------------------------------

DUE_MS = 30_000 + CHECKPOINT_GRACE_MS  # lease TTL + grace


async def test_checkpoint_of_a_dead_gateway_is_settled_once_when_due(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    await h.ctl.checkpoint(ticket, Progress(1_000_000, 0, 500_000, True, 40))
    # The gateway dies here: it never settles.
    h.clock.advance(DUE_MS - 1)
    assert await h.ctl.settle_due_checkpoints() == 0
    assert await h.store.usage(acct.id) == []
    h.clock.advance(1)
    assert await h.ctl.settle_due_checkpoints() == 1
    (event,) = await h.store.usage(acct.id)
    assert (event.status, event.prompt_tokens, event.completion_tokens, event.ttft_ms) == (
        "interrupted", 1_000_000, 500_000, 40)
    # 1M × $1.20 + 0.5M × $3.40 = $2.90, charged once.
    assert event.cost_pico == 2_900_000 * 1_000_000
    snap = await h.ctl.snapshot(acct.id)
    assert snap.weekly is not None and snap.weekly.level == (24 - Decimal("2.90")) * PICO_PER_DOLLAR
    assert await h.store.active_leases(acct.id, LARGE, h.clock.now) == 0
    assert await h.ctl.settle_due_checkpoints() == 0
    # Its gateway was only cut off, and settles late: nothing is charged twice.
    await h.ctl.settle(ticket, prompt_tokens=1_000_000, cached_tokens=0, completion_tokens=600_000, status="ok",
                       first_token=True, ttft_ms=40)
    assert len(await h.store.usage(acct.id)) == 1
    assert (await h.ctl.snapshot(acct.id)).weekly == snap.weekly


async def test_usage_events_name_the_api_a_request_came_through(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    ticket.api = "responses"
    await h.ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=5, status="ok",
                       first_token=True, ttft_ms=3)
    # A response whose gateway died is recorded from its checkpoint, with its API too.
    dead = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    dead.api = "anthropic"
    await h.ctl.checkpoint(dead, Progress(7, 0, 2, True, 4))
    h.clock.advance(DUE_MS)
    assert await h.ctl.settle_due_checkpoints() == 1
    events = await h.store.usage(acct.id)
    assert sorted((e.api, e.status) for e in events) == [("anthropic", "interrupted"), ("responses", "ok")]


def test_a_usage_event_recorded_before_events_named_their_api_still_decodes() -> None:
    old = msgpack.packb([1, T0, "acct", "key", LARGE, 10, 0, 5, 1000, 42, "ok", 3, 9, "lease"])
    assert UsageEvent.decode(old) == UsageEvent(T0, "acct", "key", LARGE, 10, 0, 5, 1000, 42, "ok", 3, 9, "lease", "")


async def test_a_settled_response_leaves_no_checkpoint_behind(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    await h.ctl.checkpoint(ticket, Progress(10, 0, 5, True, 40))
    h.clock.advance(10_000)
    await h.ctl.checkpoint(ticket, Progress(10, 0, 9, True, 40))  # replaces the first
    await h.ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=12, status="ok",
                       first_token=True, ttft_ms=40)
    h.clock.advance(DUE_MS)
    assert await h.store.due_checkpoints(h.clock.now) == []
    assert await h.ctl.settle_due_checkpoints() == 0
    (event,) = await h.store.usage(acct.id)
    assert (event.status, event.completion_tokens) == ("ok", 12)


async def test_a_replaced_checkpoint_is_due_from_its_last_write(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    await h.ctl.checkpoint(ticket, Progress(10, 0, 5, True, 40))
    h.clock.advance(10_000)
    await h.ctl.checkpoint(ticket, Progress(10, 0, 9, True, 40))
    h.clock.advance(DUE_MS - 10_000)
    assert await h.ctl.settle_due_checkpoints() == 0  # the first write's due time passed; the second's not
    h.clock.advance(10_000)
    (due,) = await h.store.due_checkpoints(h.clock.now)
    assert due.event.completion_tokens == 9 and due.lease == ticket.lease


async def _written(h: Harness, ticket: Ticket) -> None:
    """Until the renewal task's first checkpoint of `ticket` is in the store (a real round trip for Redis)."""
    for _ in range(500):
        if any(d.lease == ticket.lease for d in await h.store.due_checkpoints(h.clock.now + DUE_MS)):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no checkpoint was written")


async def test_a_response_whose_gateway_dies_before_its_first_renewal_is_still_recorded(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    renewing = h.ctl.renewing(ticket, lambda: Progress(0, 0, 0, False, None))
    await renewing.__aenter__()
    await _written(h, ticket)  # at once, not at the first renewal a third of the TTL in
    await renewing.__aexit__(None, None, None)  # the gateway dies: renewals stop, nothing settles
    h.clock.advance(DUE_MS)
    assert await h.ctl.settle_due_checkpoints() == 1
    (event,) = await h.store.usage(acct.id)
    assert (event.status, event.prompt_tokens, event.completion_tokens, event.cost_pico) == ("interrupted", 0, 0, 0)
    # Not refunded: the request-bar charge stands (the response may have streamed before the gateway died).
    assert event.weight_units == ticket.lease.weight_units > 0
    assert await h.store.active_leases(acct.id, LARGE, h.clock.now) == 0


async def test_a_short_response_that_settles_drops_its_first_checkpoint(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    async with h.ctl.renewing(ticket, lambda: Progress(0, 0, 0, False, None)):
        await _written(h, ticket)
    await h.ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=12, status="ok",
                       first_token=True, ttft_ms=40)
    h.clock.advance(DUE_MS)
    assert await h.store.due_checkpoints(h.clock.now) == []
    (event,) = await h.store.usage(acct.id)
    assert (event.status, event.completion_tokens) == ("ok", 12)


class _Flaky:
    """The store, or StoreError from every call while `down`."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.down = False

    def __getattr__(self, name: str) -> object:
        attr = getattr(self.store, name)

        async def call(*args: object, **kwargs: object) -> object:
            if self.down:
                raise StoreError("down")
            return await attr(*args, **kwargs)

        return call


async def test_after_an_outage_the_sweep_waits_a_period_so_outboxed_final_counts_win(h: Harness) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    await h.ctl.checkpoint(ticket, Progress(10, 0, 5, True, 40))
    flaky = _Flaky(h.store)
    sweeper = AdmissionController(flaky, h.ctl.settings, PRICES, clock=h.clock)  # type: ignore[arg-type]
    flaky.down = True  # an outage longer than the grace: the checkpoint falls due during it
    h.clock.advance(DUE_MS)
    assert await sweeper.sweep_once() is None
    flaky.down = False
    assert await sweeper.sweep_once() is None  # back, but the first sweep only looks
    assert await h.store.usage(acct.id) == []
    # Meanwhile the live gateway's outbox delivers the final settlement.
    await h.ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=12, status="ok",
                       first_token=True, ttft_ms=40)
    assert await sweeper.sweep_once() == 0  # the settlement dropped the checkpoint
    (event,) = await h.store.usage(acct.id)
    assert (event.status, event.completion_tokens) == ("ok", 12)
    assert await h.store.due_checkpoints(h.clock.now) == []


async def test_concurrency_is_per_model(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    other = await h.ctl.reserve(acct, "k", "hf:test/standard-2.00", queue_timeout_s=0)
    assert other.lease.model == "hf:test/standard-2.00"


# -- accounts ------------------------------------------------------------------

async def test_suspended_account_is_refused(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.accounts.set_suspended(acct.id, True)
    with pytest.raises(AdmissionRefused) as exc:
        await h.ctl.reserve(await h.accounts.get(acct.id), "k", LARGE, queue_timeout_s=0)
    assert exc.value.reason is Reason.ACCOUNT_SUSPENDED


async def test_set_packs_keeps_the_remaining_fraction_and_grows_capacity(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.burst(acct, 100)  # 400 of 500 left: 80%
    acct = await h.accounts.set_plan(acct.id, "subscription", ["standard", "founder"])
    snap = await h.ctl.snapshot(acct.id)
    assert snap.request_spec is not None and snap.request is not None
    assert snap.request_spec.capacity == 1250 * h.ctl.policy.unit
    assert snap.request.level == 1000 * h.ctl.policy.unit  # still 80%
    h.clock.advance(3 * MINUTE_MS)
    assert await h.requests_left(acct) == 1000 + 62.5


async def test_keys_create_find_revoke(h: Harness) -> None:
    acct = await h.account(["standard"])
    created = await h.accounts.create_key(acct.id)
    assert created.secret.startswith("ps-") and created.secret not in created.key.key_hash
    principal = await h.accounts.authenticate(created.secret)
    assert principal.account.id == acct.id
    assert [k.id for k in await h.store.list_keys(acct.id)] == [created.key.id]
    await h.accounts.revoke_key(created.key.id)
    assert await h.store.find_key(created.key.key_hash) is None
    with pytest.raises(NotFound):
        await h.accounts.revoke_key(created.key.id)


async def test_delete_account_removes_everything(h: Harness) -> None:
    acct = await h.account(["standard"])
    created = await h.accounts.create_key(acct.id)
    await h.one(acct, LARGE)
    await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)  # a live lease too
    await h.accounts.delete(acct.id)
    assert await h.store.get_account(acct.id) is None
    assert await h.store.find_key(created.key.key_hash) is None
    assert await h.store.list_keys(acct.id) == []
    assert await h.store.usage(acct.id) == []
    assert await h.store.active_leases(acct.id, LARGE) == 0
    with pytest.raises(NotFound):
        await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    with pytest.raises(NotFound):
        await h.accounts.delete(acct.id)


async def test_usage_retention_trims_old_events(h: Harness) -> None:
    acct = await h.account(["standard"])
    await h.one(acct, LARGE)
    h.clock.advance(15 * 24 * HOUR_MS)
    await h.one(acct, LARGE)
    events = await h.store.usage(acct.id)
    assert len(events) == 1 and events[0].ts_ms == h.clock.now


@pytest.mark.parametrize(("prompt", "cached", "completion", "message"), [
    (-1, 0, 0, "prompt_tokens must not be negative"),
    (10, 11, 0, "exceeds prompt_tokens"),
    (1.5, 0, 0, "must be an integer"),
])
async def test_impossible_token_counts_are_refused_and_nothing_is_half_written(
        h: Harness, prompt: object, cached: int, completion: int, message: str) -> None:
    acct = await h.account(["standard"])
    ticket = await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)
    with pytest.raises(UsageError, match=message):
        h.ctl.settle(ticket, prompt_tokens=prompt, cached_tokens=cached,  # type: ignore[arg-type]
                     completion_tokens=completion, status="ok", first_token=True, ttft_ms=1)
    assert await h.store.usage(acct.id) == []
    # The ticket is still live and settles normally afterwards: no slot is lost.
    await h.ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                       first_token=True, ttft_ms=1)
    assert len(await h.store.usage(acct.id)) == 1
    assert (await h.ctl.reserve(acct, "k", LARGE, queue_timeout_s=0)).lease.lease_id


async def test_a_failing_checkpoint_does_not_stop_the_renewals(tmp_path: object) -> None:
    """Checkpoints are a best effort; the renewal loop, which keeps the slot, goes on (real, short periods)."""
    clock = FakeClock()
    settings = AdmissionSettings(queue_timeout_s=0, lease_ttl_s=0.15)  # renews every 50 ms
    store = EmbeddedStore(None, request_unit=settings.weight_policy.unit, clock=clock)
    ctl = AdmissionController(store, settings, PRICES, clock=clock)
    acct = await Accounts(store, clock).create("t", "subscription", ["standard"])
    ticket = await ctl.reserve(acct, "k", LARGE)
    calls = 0
    second = asyncio.Event()

    def progress() -> Progress:
        nonlocal calls
        calls += 1
        if calls >= 2:
            second.set()
        return Progress(10, 20, 5, True, 1)  # more cached than prompt tokens: the checkpoint refuses it

    async with ctl.renewing(ticket, progress):
        await asyncio.wait_for(second.wait(), timeout=10)
    assert await store.due_checkpoints(clock.now + 10 * 60_000) == []
    await ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=5, status="ok", first_token=True,
                     ttft_ms=1)
    await ctl.drain()
    await store.close()


async def test_a_checkpoint_failing_after_its_response_ended_is_logged_not_left_unretrieved(
        caplog: pytest.LogCaptureFixture) -> None:
    """The soak (bench/soak.py) printed "Task exception was never retrieved" for such writes."""
    clock = FakeClock()
    settings = AdmissionSettings(queue_timeout_s=0)
    gate, writing = asyncio.Event(), asyncio.Event()

    class SlowFailingStore(EmbeddedStore):
        async def checkpoint(self, settlement: Settlement, ttl_ms: int, now_ms: int | None = None) -> None:
            writing.set()
            await gate.wait()
            raise StoreError("cannot reach the store")

    store = SlowFailingStore(None, request_unit=settings.weight_policy.unit, clock=clock)
    ctl = AdmissionController(store, settings, PRICES, clock=clock)
    acct = await Accounts(store, clock).create("t", "subscription", ["standard"])
    ticket = await ctl.reserve(acct, "k", LARGE)
    unhandled: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: unhandled.append(context))
    async with ctl.renewing(ticket, lambda: Progress(10, 0, 5, True, 1)):
        await asyncio.wait_for(writing.wait(), timeout=10)
    # The response has ended (the renewal loop is cancelled); its shielded write fails afterwards.
    gate.set()
    for _ in range(5):
        await asyncio.sleep(0)
    gc.collect()  # an unretrieved exception is reported when its task is collected
    assert unhandled == []
    assert [r.getMessage() for r in caplog.records if r.name == "packserve.admission"] == ["checkpoint failed"]
    await ctl.settle(ticket, prompt_tokens=10, cached_tokens=0, completion_tokens=5, status="ok", first_token=True,
                     ttft_ms=1)
    await ctl.drain()
    await store.close()


# -- model capacity (SPEC §4): one queue per model, dispatched by virtual token counters --------

def _terms(capacity: int = 2, mode: str = "fair", model: str = LARGE, ttl_ms: int = 10_000,
           preempt: bool = False) -> CapacityTerms:
    return CapacityTerms(model, capacity, SchedulerMode(mode), ttl_ms, preempt)


async def _acquire(h: Harness, terms: CapacityTerms, account: str, entry: str,
                   wait_ttl_ms: int = 60_000) -> CapacityOutcome:
    return await h.store.capacity_acquire(terms, account, entry, wait_ttl_ms, h.clock.now)


async def test_capacity_is_never_exceeded_and_a_release_dispatches_the_next(h: Harness) -> None:
    terms = _terms(2)
    assert isinstance(await _acquire(h, terms, "acct_a", "e1"), CapacityGranted)
    assert isinstance(await _acquire(h, terms, "acct_b", "e2"), CapacityGranted)
    waiter = h.store.capacity_waiter(LARGE, "e3")
    try:
        third = await _acquire(h, terms, "acct_c", "e3")
        assert isinstance(third, CapacityWaiting)
        assert third.waiting == 1 and third.wake_at_ms == h.clock.now + 10_000
        # Asking again keeps its place and does not queue it twice.
        assert isinstance(await _acquire(h, terms, "acct_c", "e3"), CapacityWaiting)
        stats = await h.store.capacity_stats(terms, h.clock.now)
        assert (stats.capacity, stats.in_flight, stats.waiting) == (2, 2, 1)
        assert await h.store.capacity_release(terms, "e1", 0, h.clock.now)
        assert await waiter.wait(5.0)  # dispatched by the release, woken at once
    finally:
        waiter.close()
    assert isinstance(await _acquire(h, terms, "acct_c", "e3"), CapacityGranted)
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (2, 0)
    # Idempotent: a second release of the same entry changes nothing.
    assert not await h.store.capacity_release(terms, "e1", 0, h.clock.now)
    assert (await h.store.capacity_stats(terms, h.clock.now)).in_flight == 2


async def test_capacity_dispatches_the_lowest_counter_first_and_fifo_by_arrival(h: Harness) -> None:
    heavy_so_far, heavy_total = counter_units(service_units(10, 50), 1), counter_units(service_units(10, 100), 1)
    light_total = counter_units(service_units(10, 20), 1)
    for mode, expected in (("fair", ["light1", "light2", "heavy3"]), ("fifo", ["heavy3", "light1", "light2"])):
        terms = _terms(1, mode, model=f"hf:test/{mode}")
        assert isinstance(await _acquire(h, terms, "heavy", "heavy1"), CapacityGranted)
        # The heavy account has received service (a renewal while it streams) before the others arrive;
        # the light account arrives idle and is lifted to the heavy one's counter as it stands.
        assert await h.store.capacity_renew(terms, "heavy1", heavy_so_far, h.clock.now)
        for entry, account in (("heavy3", "heavy"), ("light1", "light"), ("light2", "light")):
            assert isinstance(await _acquire(h, terms, account, entry), CapacityWaiting)
        order: list[str] = []
        running, total = "heavy1", heavy_total
        for _ in range(3):
            await h.store.capacity_release(terms, running, total, h.clock.now)
            granted = [e for e in ("heavy3", "light1", "light2") if e not in order and isinstance(
                await _acquire(h, terms, "heavy" if e.startswith("heavy") else "light", e), CapacityGranted)]
            assert len(granted) == 1, (mode, granted)
            order.append(granted[0])
            running, total = granted[0], heavy_total if granted[0].startswith("heavy") else light_total
        assert order == expected, mode


async def test_a_returning_account_is_lifted_so_idle_time_is_not_banked(h: Harness) -> None:
    terms = _terms(1)
    assert isinstance(await _acquire(h, terms, "busy", "b1"), CapacityGranted)
    assert await h.store.capacity_renew(terms, "b1", 5_000, h.clock.now)
    assert isinstance(await _acquire(h, terms, "back", "r1"), CapacityWaiting)
    loads = {a.account_id: a for a in (await h.store.capacity_stats(terms, h.clock.now)).accounts}
    assert loads["back"].counter == 5_000 and loads["back"].waiting == 1
    assert loads["busy"].counter == 5_000 and loads["busy"].running == 1
    await h.store.capacity_release(terms, "b1", 8_000, h.clock.now)
    assert isinstance(await _acquire(h, terms, "back", "r1"), CapacityGranted)
    await h.store.capacity_release(terms, "r1", 0, h.clock.now)
    # Nobody active: an account that comes back is lifted to the one that left last (back: 5_000).
    assert isinstance(await _acquire(h, terms, "fresh", "f1"), CapacityGranted)
    loads = {a.account_id: a for a in (await h.store.capacity_stats(terms, h.clock.now)).accounts}
    assert loads["fresh"].counter == 5_000


async def test_counters_grow_at_renewals_by_running_totals(h: Harness) -> None:
    terms = _terms(1)
    assert isinstance(await _acquire(h, terms, "acct", "e"), CapacityGranted)
    assert await h.store.capacity_renew(terms, "e", 100, h.clock.now)
    assert await h.store.capacity_renew(terms, "e", 100, h.clock.now)  # a retried renewal adds nothing
    assert await h.store.capacity_renew(terms, "e", 250, h.clock.now)
    loads = (await h.store.capacity_stats(terms, h.clock.now)).accounts
    assert [(a.account_id, a.counter) for a in loads] == [("acct", 250)]


async def test_a_returning_account_ties_and_goes_before_the_older_queue_of_a_busier_one(h: Harness) -> None:
    terms = _terms(1)
    assert isinstance(await _acquire(h, terms, "busy", "b1"), CapacityGranted)
    for entry in ("b2", "b3"):
        assert isinstance(await _acquire(h, terms, "busy", entry), CapacityWaiting)
    # Lifted to the busy account's counter: a tie, and "busy" holds three requests to its one.
    assert isinstance(await _acquire(h, terms, "back", "r1"), CapacityWaiting)
    await h.store.capacity_release(terms, "b1", 0, h.clock.now)
    assert isinstance(await _acquire(h, terms, "back", "r1"), CapacityGranted)
    assert isinstance(await _acquire(h, terms, "busy", "b2"), CapacityWaiting)


async def _heavy_holds_the_model(h: Harness) -> CapacityTerms:
    """Two sequences, both "heavy"'s (h1 served 9_000 counter units so far), and its h3 waiting."""
    terms = _terms(2, preempt=True)
    for entry in ("h1", "h2"):
        assert isinstance(await _acquire(h, terms, "heavy", entry), CapacityGranted)
    assert await h.store.capacity_renew(terms, "h1", 9_000, h.clock.now)
    assert isinstance(await _acquire(h, terms, "heavy", "h3"), CapacityWaiting)
    return terms


async def test_preemption_dispatches_a_returning_account_over_a_full_model_once(h: Harness) -> None:
    terms = await _heavy_holds_the_model(h)
    # Nothing running for "light": its request goes at once, over the capacity, naming the account to pause.
    assert await _acquire(h, terms, "light", "l1") == CapacityGranted(h.clock.now + 10_000, "heavy")
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (3, 1)
    # One over at most: a second returning account waits, and so does "light" with a sequence running.
    assert isinstance(await _acquire(h, terms, "other", "o1"), CapacityWaiting)
    assert isinstance(await _acquire(h, terms, "light", "l2"), CapacityWaiting)
    # A release brings the model back to its capacity, and the paused sequence resumes: nobody is dispatched.
    await h.store.capacity_release(terms, "h2", 9_000, h.clock.now)
    assert isinstance(await _acquire(h, terms, "other", "o1"), CapacityWaiting)
    # Full again, "other" (nothing running) is next in fair order: it pauses one of "heavy"'s sequences.
    await h.store.capacity_release(terms, "l1", 0, h.clock.now)
    granted = await _acquire(h, terms, "other", "o1")
    assert isinstance(granted, CapacityGranted) and granted.preempt is None  # l1's sequence was free
    await h.store.capacity_release(terms, "o1", 0, h.clock.now)
    assert isinstance(await _acquire(h, terms, "light", "l2"), CapacityGranted)
    # Full with one sequence each ("heavy" h1, "light" l2): nobody holds two, so nobody is paused.
    assert isinstance(await _acquire(h, terms, "other", "o2"), CapacityWaiting)


async def test_preemption_needs_a_victim_behind_the_waiter_and_fair_mode(h: Harness) -> None:
    for mode in ("fair", "fifo"):
        terms = _terms(2, mode, model=f"hf:test/p-{mode}", preempt=True)
        for entry, account in (("a1", "a"), ("b1", "b")):
            assert isinstance(await _acquire(h, terms, account, entry), CapacityGranted)
        # Each running account holds one sequence: nobody is paused, the newcomer waits.
        assert isinstance(await _acquire(h, terms, "c", "c1"), CapacityWaiting)
        await h.store.capacity_release(terms, "b1", 0, h.clock.now)
        assert await _acquire(h, terms, "c", "c1") == CapacityGranted(h.clock.now + 10_000)
        assert isinstance(await _acquire(h, terms, "c", "c2"), CapacityWaiting)
        await h.store.capacity_release(terms, "a1", 0, h.clock.now)
        assert isinstance(await _acquire(h, terms, "c", "c2"), CapacityGranted)
        # "c" holds both now; "d" comes back: fair pauses one of "c"'s, fifo never preempts.
        outcome = await _acquire(h, terms, "d", "d1")
        if mode == "fair":
            assert outcome == CapacityGranted(h.clock.now + 10_000, "c")
        else:
            assert isinstance(outcome, CapacityWaiting)


async def test_a_paused_sequence_waits_in_fair_order_for_the_next_free_one(h: Harness) -> None:
    terms = await _heavy_holds_the_model(h)
    assert await _acquire(h, terms, "light", "l1") == CapacityGranted(h.clock.now + 10_000, "heavy")
    assert isinstance(await _acquire(h, terms, "late", "t1"), CapacityWaiting)  # one over already
    # "light" ends: the paused heavy sequence would take its sequence, but "late" stands before "heavy"
    # (the same counter, fewer requests held): "late" goes over capacity in turn and the pause goes on.
    await h.store.capacity_release(terms, "l1", 0, h.clock.now)
    assert await _acquire(h, terms, "late", "t1") == CapacityGranted(h.clock.now + 10_000, "heavy")
    assert (await h.store.capacity_stats(terms, h.clock.now)).in_flight == 3
    # "late" ends: next in fair order is "heavy" itself, so its paused sequence resumes on the freed one
    # and its waiting request still waits ...
    await h.store.capacity_release(terms, "t1", 0, h.clock.now)
    assert isinstance(await h.store.capacity_acquire(terms, "heavy", "h3", 60_000, h.clock.now, join=False),
                      CapacityWaiting)
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (2, 1)
    # ... until one of its sequences ends.
    await h.store.capacity_release(terms, "h2", 9_000, h.clock.now)
    assert await h.store.capacity_acquire(terms, "heavy", "h3", 60_000, h.clock.now, join=False) == \
        CapacityGranted(h.clock.now + 10_000)


async def test_a_waiter_granted_by_preemption_learns_its_victim_when_it_asks_again(h: Harness) -> None:
    terms = _terms(2, preempt=True)
    for entry in ("h1", "h2"):
        assert isinstance(await _acquire(h, terms, "heavy", entry), CapacityGranted)
    waiter = h.store.capacity_waiter(LARGE, "l1")
    try:
        # Without preemption (another gateway's view) the light request waits ...
        assert isinstance(await _acquire(h, _terms(2), "light", "l1"), CapacityWaiting)
        # ... and the next step of a gateway that preempts dispatches it, waking it.
        await h.store.capacity_stats(terms, h.clock.now)
        assert await waiter.wait(5.0)
    finally:
        waiter.close()
    again = await h.store.capacity_acquire(terms, "light", "l1", 60_000, h.clock.now, join=False)
    assert again == CapacityGranted(h.clock.now + 10_000, "heavy")
    await h.store.capacity_release(terms, "l1", 0, h.clock.now)
    await h.store.capacity_release(terms, "h2", 0, h.clock.now)
    # The mark left with the entry: the same id back on a free sequence pauses nobody.
    assert await _acquire(h, terms, "light", "l1") == CapacityGranted(h.clock.now + 10_000)


async def test_deleting_an_account_drops_its_scheduler_counters(h: Harness) -> None:
    gone, stays = await h.account(["standard"]), await h.account(["standard"])
    for model in (LARGE, "hf:test/other"):
        terms = _terms(2, model=model)
        assert isinstance(await _acquire(h, terms, gone.id, f"{model}-g1"), CapacityGranted)
        assert isinstance(await _acquire(h, terms, stays.id, f"{model}-s1"), CapacityGranted)
        await h.store.capacity_release(terms, f"{model}-g1", 50_000, h.clock.now)  # idle, counter 50_000
    await h.accounts.delete(gone.id)
    for model in (LARGE, "hf:test/other"):
        terms = _terms(2, model=model)
        # The same id coming back (nothing of the account is left) starts at the active floor, not at 50_000.
        assert isinstance(await _acquire(h, terms, gone.id, f"{model}-g2"), CapacityGranted)
        loads = {a.account_id: a.counter for a in (await h.store.capacity_stats(terms, h.clock.now)).accounts}
        assert loads == {stays.id: 0, gone.id: 0}, model


async def test_a_dead_gateways_capacity_comes_back_when_its_lease_expires(h: Harness) -> None:
    terms = _terms(1, ttl_ms=3_000)
    assert isinstance(await _acquire(h, terms, "dead", "d1"), CapacityGranted)
    waiting = await _acquire(h, terms, "alive", "a1")
    assert isinstance(waiting, CapacityWaiting) and waiting.wake_at_ms == h.clock.now + 3_000
    h.clock.advance(2_000)
    assert await h.store.capacity_renew(terms, "d1", 0, h.clock.now) is True  # renewed: still alive
    h.clock.advance(2_999)
    assert isinstance(await _acquire(h, terms, "alive", "a1"), CapacityWaiting)
    h.clock.advance(1)
    assert isinstance(await _acquire(h, terms, "alive", "a1"), CapacityGranted)
    # The dead holder's renewal now fails: its sequence is someone else's.
    assert await h.store.capacity_renew(terms, "d1", 0, h.clock.now) is False


async def test_a_waiter_that_stops_asking_is_dropped_and_a_leaver_at_once(h: Harness) -> None:
    terms = _terms(1)
    assert isinstance(await _acquire(h, terms, "a", "run"), CapacityGranted)
    assert isinstance(await _acquire(h, terms, "b", "gone", wait_ttl_ms=1_000), CapacityWaiting)
    assert isinstance(await _acquire(h, terms, "c", "leaver"), CapacityWaiting)
    assert await h.store.capacity_release(terms, "leaver", 0, h.clock.now)  # a client that hung up
    h.clock.advance(1_000)
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (1, 0)
    assert [a.account_id for a in stats.accounts] == ["a"]


async def test_a_late_ask_after_the_release_does_not_queue_the_entry_again(h: Harness) -> None:
    """A wait cancelled with its ask in flight: the ask may reach the store after the release (another
    connection). Asked again without joining, a released entry is gone, not a new waiter nobody serves."""
    terms = _terms(1)
    assert isinstance(await _acquire(h, terms, "a", "run"), CapacityGranted)
    assert isinstance(await _acquire(h, terms, "b", "w1"), CapacityWaiting)
    again = await h.store.capacity_acquire(terms, "b", "w1", 60_000, h.clock.now, join=False)
    assert isinstance(again, CapacityWaiting)  # still waiting: asking again keeps its place
    assert await h.store.capacity_release(terms, "w1", 0, h.clock.now)
    late = await h.store.capacity_acquire(terms, "b", "w1", 60_000, h.clock.now, join=False)
    assert isinstance(late, CapacityGone)
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (1, 0)
    assert await h.store.capacity_release(terms, "run", 0, h.clock.now)
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (0, 0)  # nothing dispatched onto the freed sequence
    # A running entry asked again is still its grant.
    assert isinstance(await _acquire(h, terms, "c", "r2"), CapacityGranted)
    assert isinstance(await h.store.capacity_acquire(terms, "c", "r2", 60_000, h.clock.now, join=False),
                      CapacityGranted)


async def test_a_waiter_dropped_while_its_process_stalled_joins_again(h: Harness) -> None:
    """Its wait TTL passed while it still waits (the process stalled): the next ask finds it gone and
    joins again instead of waiting on an entry nobody will dispatch."""
    settings = SchedulerSettings(poll_interval_s=0.01, lease_ttl_s=10)
    sched = Scheduler(h.store, settings, AdmissionSettings(queue_timeout_s=5), lambda _m: 1, h.clock)
    holder = await h.account(["standard"])
    waiter = await h.account(["standard"])
    hold = await sched.acquire(holder, LARGE)
    assert hold is not None
    terms = sched.terms(LARGE)
    assert terms is not None
    attempt = sched.attempt(waiter, LARGE, timeout_s=30)
    assert attempt is not None and await attempt.try_now() is None  # queued
    # Before its wait starts, the store's clock moves past the waiter's TTL (its wait bound plus a lease
    # TTL) while the holder renews: a stats call drops the waiter as dead.
    for _ in range(9):
        h.clock.advance(5_000)
        assert await h.store.capacity_renew(terms, hold.entry_id, 0, h.clock.now)
    assert (await h.store.capacity_stats(terms, h.clock.now)).waiting == 0
    task = asyncio.ensure_future(attempt.wait())
    for _ in range(2000):  # its first ask finds it gone and joins again
        if (await h.store.capacity_stats(terms, h.clock.now)).waiting == 1:
            break
        await asyncio.sleep(0.005)
    assert (await h.store.capacity_stats(terms, h.clock.now)).waiting == 1
    sched.release(hold, 0)
    granted = await asyncio.wait_for(task, timeout=10)
    assert granted is not None
    sched.release(granted, 0)
    await sched.drain()
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (0, 0)


async def test_scheduler_refuses_past_the_wait_bound_and_leaves_no_waiter(h: Harness) -> None:
    settings = SchedulerSettings(poll_interval_s=0.01, lease_ttl_s=10)
    sched = Scheduler(h.store, settings, AdmissionSettings(queue_timeout_s=5), lambda _m: 1, h.clock)
    first = await h.account(["standard", "founder"])
    second = await h.account(["standard"])
    hold = await sched.acquire(first, LARGE)
    assert hold is not None and hold.weight == 2
    with pytest.raises(Overloaded):
        await sched.acquire(second, LARGE, timeout_s=0.05)
    # A cancelled wait (the client hung up) leaves the queue too.
    task = asyncio.ensure_future(sched.acquire(second, LARGE, timeout_s=30))
    for _ in range(2000):  # until it is queued (a real wait: it runs on the event loop)
        if sched.load.waiting.get(LARGE):
            break
        await asyncio.sleep(0.005)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    terms = sched.terms(LARGE)
    assert terms is not None
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert (stats.in_flight, stats.waiting) == (1, 0)
    sched.release(hold, service_units(10, 10))
    await sched.drain()
    stats = await h.store.capacity_stats(terms, h.clock.now)
    assert stats.in_flight == 0 and stats.accounts == ()
    # A model without a capacity is not scheduled at all.
    assert await Scheduler(h.store, settings, AdmissionSettings(), lambda _m: None, h.clock).acquire(
        first, LARGE) is None


async def test_auth_failures_are_counted_per_source_and_refused_past_the_limit(h: Harness) -> None:
    now = h.clock.now
    window_end = (now // MINUTE_MS + 1) * MINUTE_MS
    verdicts = [await h.store.record_auth_failure("198.51.100.1", 3, MINUTE_MS, now) for _ in range(5)]
    assert [(v.failures, v.refused) for v in verdicts] == [(1, False), (2, False), (3, False), (4, True), (5, True)]
    assert all(v.retry_after_ms == window_end - now for v in verdicts)
    # Another address is not affected.
    other = await h.store.record_auth_failure("198.51.100.2", 3, MINUTE_MS, now)
    assert (other.failures, other.refused) == (1, False)
    # The next window starts from zero.
    later = await h.store.record_auth_failure("198.51.100.1", 3, MINUTE_MS, window_end)
    assert (later.failures, later.refused, later.retry_after_ms) == (1, False, MINUTE_MS)



async def test_usage_past_retention_is_purged_for_accounts_that_went_quiet(h: Harness) -> None:
    """Settling trims only the settling account; the periodic purge (every gateway runs it) trims all."""
    quiet = await h.account(["standard"])
    active = await h.account(["standard"])
    await h.one(quiet, LARGE)
    await h.one(active, LARGE)
    h.clock.advance(14 * 24 * HOUR_MS - 1)
    assert await purge_once(h.store, h.ctl.settings.retention_ms, h.clock.now) == 0
    h.clock.advance(2)
    await h.one(active, LARGE)
    assert len(await h.store.usage(quiet.id)) == 1  # nobody settled for it: still there
    assert await purge_once(h.store, h.ctl.settings.retention_ms, h.clock.now) == 1
    assert await h.store.usage(quiet.id) == []
    assert [e.ts_ms for e in await h.store.usage(active.id)] == [h.clock.now]
