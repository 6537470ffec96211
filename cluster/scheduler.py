"""The capacity scheduler: an admitted request waits here for a free sequence of its model.

One instance per gateway process; the state (capacity in use, who waits, the
virtual token counters) is in the store, so every gateway on one Redis sees
one queue per model. Contract:
- A model with a capacity (sequences at once) never runs more than that many
  requests dispatched through packserve; the others wait, and when a sequence
  frees the store dispatches the next one in `fair` (policies.fairness) or
  `fifo` order; with `preempt`, one request more may be dispatched over a
  full model, whose engine pauses a sequence of the account the grant names
  (policies.fairness.preemption_victim). A waiting request is woken when it is dispatched (pub/sub on
  Redis, an event embedded) and re-checks every `poll_interval_s` and at the
  earliest lease expiry in case a wake-up was lost or a holder died.
- A model without a capacity (None: the engine takes everything) is not
  scheduled: no store call at all.
- A request that waits longer than the bound raises `Overloaded`; a cancelled
  wait (client gone) leaves the queue in a shielded step, at once.
- While a dispatched request streams, its lease is renewed and its account's
  counter grown every `charge_interval_s`; `release` counts the rest and
  frees the sequence, in its own task so a cancelled request still releases.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from cluster.accounts import new_id
from cluster.records import Account
from cluster.settings import AdmissionSettings, SchedulerSettings
from cluster.store import (
    CapacityGone,
    CapacityGranted,
    CapacityOutcome,
    CapacityStats,
    CapacityTerms,
    CapacityWaiting,
    Store,
    StoreError,
)
from policies.fairness import account_weight, counter_units
from policies.plans import PlanKind

log = logging.getLogger("packserve.scheduler")

Clock = Callable[[], int | None]
Capacity = Callable[[str], int | None]
Service = Callable[[], int]


class Overloaded(Exception):
    """No sequence of the model freed up within the wait bound."""

    def __init__(self, model: str, waited_s: float, retry_after_s: int) -> None:
        super().__init__(f"model {model} is at capacity")
        self.model = model
        self.waited_s = waited_s
        self.retry_after_s = retry_after_s


@dataclass
class CapacityHold:
    """A dispatched request's sequence: what to renew, charge and release."""

    terms: CapacityTerms
    entry_id: str
    account_id: str
    weight: int
    waited_s: float
    preempt: str | None = None  # dispatched over a full model: the engine pauses a sequence of this account
    charged: int = 0  # counter units sent so far
    released: bool = False


@dataclass
class ModelLoad:
    """This gateway's own waiting requests per model (the store holds the global view)."""

    waiting: dict[str, int] = field(default_factory=dict)
    overloaded: int = 0


class CapacityAttempt:
    """One request's way to a sequence: `try_now()` (one store step), then `wait()` if it was queued.

    Split so the common case (a free sequence) costs one store call and
    nothing else; `wait()` keeps the place `try_now()` took in the queue, and
    always leaves the queue when it ends without a grant (shielded, so a
    cancelled wait leaves it at once). An attempt that is never waited on
    must be `close()`d.
    """

    def __init__(self, scheduler: Scheduler, account: Account, terms: CapacityTerms, timeout_s: float) -> None:
        self._s = scheduler
        self._account = account
        self.terms = terms
        self._timeout_s = timeout_s
        self.entry = new_id("cap")
        self._started = time.monotonic()
        # Registered before the first store step, so a dispatch right after it is not missed.
        self._waiter = scheduler.store.capacity_waiter(terms.model, self.entry)
        self._last: CapacityOutcome | None = None
        self._done = False

    def waited_s(self) -> float:
        return time.monotonic() - self._started

    def _granted(self, outcome: CapacityGranted) -> CapacityHold:
        self._done = True
        self._waiter.close()
        return CapacityHold(self.terms, self.entry, self._account.id, self._s.weight(self._account),
                            time.monotonic() - self._started, outcome.preempt)

    async def _ask(self, *, join: bool) -> CapacityOutcome:
        remaining = self._timeout_s - (time.monotonic() - self._started)
        # A waiter that stops asking (its gateway died) is dropped a lease TTL after its deadline.
        wait_ttl_ms = int(max(remaining, 0) * 1000) + self._s.lease_ttl_ms
        return await self._s.store.capacity_acquire(self.terms, self._account.id, self.entry, wait_ttl_ms,
                                                    self._s.clock(), join=join)

    async def try_now(self) -> CapacityHold | None:
        """Dispatched at once (a hold), or None: queued, `wait()` next."""
        try:
            outcome = await self._ask(join=True)
        except BaseException:
            await self.close()
            raise
        if isinstance(outcome, CapacityGranted):
            return self._granted(outcome)
        self._last = outcome
        return None

    async def wait(self) -> CapacityHold:
        """Wait for the grant; raises Overloaded past the bound."""
        if self._last is None:
            raise RuntimeError("wait() follows a try_now() that queued the request")
        s = self._s
        model = self.terms.model
        s.load.waiting[model] = s.load.waiting.get(model, 0) + 1
        try:
            outcome = self._last
            while True:
                remaining = self._timeout_s - (time.monotonic() - self._started)
                if remaining <= 0:
                    s.load.overloaded += 1
                    raise Overloaded(model, time.monotonic() - self._started, s.settings.overload_retry_after_s)
                wait_s = min(remaining, s.settings.poll_interval_s)
                if isinstance(outcome, CapacityWaiting) and outcome.wake_at_ms is not None:
                    # A dead holder never releases: re-check when its lease can expire.
                    wait_s = min(wait_s, max(0.005, (outcome.wake_at_ms - s.now_ms()) / 1000 + 0.005))
                await self._waiter.wait(wait_s)
                # Never a join here: were this wait cancelled with the ask in flight, the ask could reach
                # the store after close()'s release and would queue a waiter nobody serves.
                outcome = await self._ask(join=False)
                if isinstance(outcome, CapacityGone):
                    # Dropped as a dead waiter while this process stalled past its wait TTL: join again.
                    outcome = await self._ask(join=True)
                if isinstance(outcome, CapacityGranted):
                    return self._granted(outcome)
        finally:
            s.load.waiting[model] -= 1
            await self.close()

    async def close(self) -> None:
        """Leave the queue if still in it (idempotent)."""
        if self._done:
            return
        self._done = True
        self._waiter.close()
        # Shielded: a client that hung up leaves the queue now, not when its waiter expires.
        with contextlib.suppress(StoreError):
            await asyncio.shield(self._s.store.capacity_release(self.terms, self.entry, 0, self._s.clock()))


class Scheduler:
    def __init__(self, store: Store, settings: SchedulerSettings, admission: AdmissionSettings, capacity: Capacity,
                 clock: Clock) -> None:
        self.store = store
        self.settings = settings
        self.capacity = capacity
        self.timeout_s = settings.timeout_s(admission)
        self.lease_ttl_ms = settings.lease_ttl_ms(admission)
        self.clock = clock
        self.load = ModelLoad()
        self._releasing: set[asyncio.Task[None]] = set()

    def terms(self, model: str) -> CapacityTerms | None:
        capacity = self.capacity(model)
        if capacity is None:
            return None
        return CapacityTerms(model, capacity, self.settings.mode, self.lease_ttl_ms, self.settings.preempt)

    def weight(self, account: Account) -> int:
        packs = len(account.packs) if account.plan is PlanKind.SUBSCRIPTION else None
        return account_weight(packs, self.settings.payg_weight)

    def attempt(self, account: Account, model: str, timeout_s: float | None = None) -> CapacityAttempt | None:
        """A request for one of `model`'s sequences; None when the model is not scheduled."""
        terms = self.terms(model)
        if terms is None:
            return None
        return CapacityAttempt(self, account, terms, self.timeout_s if timeout_s is None else timeout_s)

    async def acquire(self, account: Account, model: str, timeout_s: float | None = None) -> CapacityHold | None:
        """Wait for a free sequence of `model`; None when the model is not scheduled. Raises Overloaded."""
        attempt = self.attempt(account, model, timeout_s)
        if attempt is None:
            return None
        return await attempt.try_now() or await attempt.wait()

    def now_ms(self) -> int:
        now = self.clock()
        return time.time_ns() // 1_000_000 if now is None else now

    def _current(self, hold: CapacityHold) -> CapacityTerms:
        """The hold's terms with the model's capacity as it is now (replicas come and go)."""
        return self.terms(hold.terms.model) or hold.terms

    def _units(self, hold: CapacityHold, service: int) -> int:
        return max(hold.charged, counter_units(service, hold.weight))

    @contextlib.asynccontextmanager
    async def holding(self, hold: CapacityHold | None, service: Service) -> AsyncIterator[None]:
        """Renew the hold's lease and grow its account's counter while the body runs."""
        if hold is None:
            yield
            return

        async def _loop() -> None:
            period = min(self.settings.charge_interval_s, self.lease_ttl_ms / 3000)
            while True:
                await asyncio.sleep(period)
                units = self._units(hold, service())
                try:
                    renewed = await self.store.capacity_renew(self._current(hold), hold.entry_id, units, self.clock())
                except StoreError:
                    log.warning("capacity renewal failed", extra={"entry": hold.entry_id, "model": hold.terms.model})
                    continue
                hold.charged = units
                if not renewed:
                    # Its lease expired (the store was away longer than the TTL): the sequence may be
                    # someone else's now, so this response runs over capacity until it ends.
                    log.warning("capacity lease lost while streaming", extra={
                        "entry": hold.entry_id, "model": hold.terms.model})
                    return

        task = asyncio.get_running_loop().create_task(_loop())
        try:
            yield
        finally:
            task.cancel()

    def release(self, hold: CapacityHold | None, service: int) -> None:
        """Count the hold's service and free its sequence, in a task of its own (idempotent)."""
        if hold is None or hold.released:
            return
        hold.released = True
        units = self._units(hold, service)
        task = asyncio.get_running_loop().create_task(self._release(hold, units))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _release(self, hold: CapacityHold, units: int) -> None:
        try:
            await self.store.capacity_release(self._current(hold), hold.entry_id, units, self.clock())
        except StoreError:
            # Its lease expires within the TTL and frees the sequence; only this response's counting is lost.
            log.warning("capacity release failed; the lease will expire", extra={
                "entry": hold.entry_id, "model": hold.terms.model})

    async def stats(self, models: list[str]) -> list[CapacityStats]:
        out = []
        for model in models:
            terms = self.terms(model)
            if terms is not None:
                out.append(await self.store.capacity_stats(terms, self.clock()))
        return out

    async def drain(self) -> None:
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
