"""The admission controller: reserve → (renew while streaming) → settle.

One instance per gateway process; all shared state is in the store, so any
number of gateways agree. Contract:
- `reserve` is one atomic store step per attempt. A request that finds no
  free slot waits in its account's FIFO queue (woken by the store when a
  slot frees, or when the earliest lease could expire) up to the queue
  timeout, and is charged nothing while it waits.
- `settle` runs exactly once per admitted request however it ended, and is
  never lost: it runs in its own task (a cancelled request cannot cancel
  it), and if the store is unreachable it goes to the outbox and is retried.
- Every admitted request that runs under `renewing` leaves a checkpoint in
  the store (its settlement as it stands, status "interrupted"): written as
  it starts (with the counts it has by then, usually none), replaced at
  every renewal and dropped when it settles. If its gateway dies, the checkpoint falls due and any gateway's
  sweep settles it: a usage event is recorded and the weekly bar debited for
  what was streamed up to the last renewal, so no admitted request goes
  unrecorded however short it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cluster.accounts import new_id
from cluster.outbox import SettleOutbox
from cluster.records import Account, UsageEvent
from cluster.refusals import refusal_message
from cluster.settings import AdmissionSettings
from cluster.store import (
    Admitted,
    Lease,
    Refused,
    ReserveRequest,
    Settlement,
    Snapshot,
    Store,
    StoreError,
)
from policies.admission import Reason
from policies.bars import ceil_seconds
from policies.plans import PlanKind
from policies.pricing import ModelPrice, UsageError, token_cost_pico

if TYPE_CHECKING:
    from cluster.scheduler import CapacityHold

log = logging.getLogger("packserve.admission")

Clock = Callable[[], int | None]
# A checkpoint falls due this long after its lease would have expired; see `checkpoint`.
CHECKPOINT_GRACE_MS = 5 * 60 * 1000
# Admitted requests that were never dispatched (the model stayed saturated past the wait bound, or the
# client hung up while waiting for it): their request-bar charge is given back, as for a failure
# before the first token.
UNSERVED_STATUSES = frozenset({"overloaded", "client_closed"})


def store_clock() -> int | None:
    """The default: let the store decide (Redis TIME), so gateways agree."""
    return None


class AdmissionRefused(Exception):
    def __init__(self, reason: Reason, retry_after_s: int | None, snapshot: Snapshot | None, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.snapshot = snapshot


class UnknownModel(KeyError):
    pass




@dataclass
class Ticket:
    """An admitted request: what it holds and what it will be charged against."""

    lease: Lease
    account: Account
    key_id: str
    price: ModelPrice
    snapshot: Snapshot
    queued_s: float
    started_mono: float = field(default_factory=time.monotonic)
    settled: bool = False
    checkpointed: bool = False
    # The API the request came through, for its usage record; set once the gateway knows it.
    api: str = ""
    # The model sequence it was dispatched on (None: the model is not capacity-scheduled) and how long
    # it waited for one.
    capacity: CapacityHold | None = None
    capacity_wait_s: float = 0.0


@dataclass(frozen=True)
class Progress:
    """A response's counts so far (or final): what its settlement charges."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    first_token: bool
    ttft_ms: int | None


@dataclass
class QueueStats:
    depth: int = 0
    waited_total: int = 0


class AdmissionController:
    def __init__(self, store: Store, settings: AdmissionSettings, prices: Mapping[str, ModelPrice],
                 clock: Clock = store_clock, outbox: SettleOutbox | None = None) -> None:
        self.store = store
        self.settings = settings
        self.prices = dict(prices)
        self.policy = settings.weight_policy
        self._clock = clock
        self.outbox = outbox if outbox is not None else SettleOutbox(store)
        self._settling: set[asyncio.Task[Snapshot | None]] = set()
        # Sees every decision's snapshot (usage alerts, cluster.alerts); must not block.
        self.observer: Callable[[Snapshot | None, str, Reason | None], None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.queue = QueueStats()
        self.active = 0
        self._store_was_away = False

    def price(self, model: str) -> ModelPrice:
        try:
            return self.prices[model]
        except KeyError:
            raise UnknownModel(model) from None

    async def reserve(self, account: Account, key_id: str, model: str,
                      queue_timeout_s: float | None = None) -> Ticket:
        price = self.price(model)
        timeout = self.settings.queue_timeout_s if queue_timeout_s is None else queue_timeout_s
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + timeout
        waiter_id = new_id("wait") if timeout > 0 else None
        waiter = self.store.slot_waiter(account.id, model) if waiter_id else None
        admitted = False
        queued = False
        try:
            while True:
                remaining = deadline - loop.time()
                request = ReserveRequest(
                    account_id=account.id, model=model, size_class=price.size_class,
                    weight_units=self.policy.units(price), lease_id=new_id("lease"),
                    lease_ttl_ms=self.settings.lease_ttl_ms, waiter_id=waiter_id,
                    waiter_ttl_ms=int((max(remaining, 0) + self.settings.lease_ttl_s) * 1000), key_id=key_id)
                outcome = await self.store.reserve(request, self._clock())
                if isinstance(outcome, Admitted):
                    if self.observer is not None:
                        self.observer(outcome.snapshot, key_id, None)
                    admitted = True
                    self.active += 1
                    return Ticket(outcome.lease, outcome.snapshot.account, key_id, price, outcome.snapshot,
                                  loop.time() - started)
                if isinstance(outcome, Refused):
                    if self.observer is not None:
                        self.observer(outcome.snapshot, key_id, outcome.reason)
                    raise AdmissionRefused(outcome.reason, _retry_s(outcome.retry_after_ms), outcome.snapshot,
                                           refusal_message(outcome.reason, outcome.snapshot,
                                                           self.settings.dashboard_url))
                if waiter is None or remaining <= 0:
                    retry = 1 if outcome.wake_at_ms is None else _retry_s(outcome.wake_at_ms - self._now_ms())
                    raise AdmissionRefused(Reason.CONCURRENCY_LIMIT,
                                           min(retry or 1, ceil_seconds(self.settings.lease_ttl_ms)), None,
                                           refusal_message(Reason.CONCURRENCY_LIMIT, None,
                                                           self.settings.dashboard_url))
                if not queued:
                    queued = True
                    self.queue.depth += 1
                    self.queue.waited_total += 1
                wait_s = remaining
                if outcome.wake_at_ms is not None:
                    # A crashed holder never settles: re-check when its lease could expire.
                    wait_s = min(wait_s, max(0.01, (outcome.wake_at_ms - self._now_ms()) / 1000 + 0.005))
                await waiter.wait(wait_s)
        finally:
            if queued:
                self.queue.depth -= 1
            if waiter is not None:
                waiter.close()
            if waiter_id is not None and not admitted:
                with contextlib.suppress(StoreError):
                    await asyncio.shield(self.store.leave_queue(account.id, model, waiter_id))

    def _now_ms(self) -> int:
        now = self._clock()
        return time.time_ns() // 1_000_000 if now is None else now

    async def renew(self, ticket: Ticket) -> bool:
        return await self.store.renew(ticket.lease, self.settings.lease_ttl_ms, self._clock())

    @contextlib.asynccontextmanager
    async def renewing(self, ticket: Ticket,
                       progress: Callable[[], Progress] | None = None) -> AsyncIterator[asyncio.Event]:
        """Keep the lease alive while a response streams (renews at a third of the TTL).

        With `progress` (the response's counts so far), what to settle if
        this process dies before it settles is checkpointed at once (so a
        short response is covered too) and again at each renewal. One task
        does both, so a checkpoint never overtakes a later one. Yields an
        event set once the first checkpoint has been written (or has failed):
        a response waits for it before its first chunk leaves, so a process
        killed the moment a client sees output still leaves the record.
        """

        def _written(write: asyncio.Future[None]) -> None:
            # Its outcome is read here, not where it is awaited: once the response has ended (the loop
            # cancelled, the write shielded) nothing awaits it, and asyncio would print the failure
            # ("Task exception was never retrieved") instead of this structured line.
            exc = None if write.cancelled() else write.exception()
            if isinstance(exc, StoreError | UsageError):
                # Best effort: the renewal, which keeps the slot, must go on.
                log.warning("checkpoint failed", extra={"lease": ticket.lease.lease_id, "error": str(exc)})
            elif exc is not None:
                log.error("checkpoint raised", extra={"lease": ticket.lease.lease_id}, exc_info=exc)

        async def _checkpoint() -> None:
            if progress is None:
                return
            # Shielded: a response that ends while its first checkpoint is being written must not
            # cancel the write (redis-py drops a connection whose command is cancelled mid-flight).
            write = asyncio.ensure_future(self.checkpoint(ticket, progress()))
            write.add_done_callback(_written)
            with contextlib.suppress(StoreError, UsageError):
                await asyncio.shield(write)

        first_written = asyncio.Event()

        async def _loop() -> None:
            period = self.settings.lease_ttl_s / 3
            try:
                await _checkpoint()
            finally:
                first_written.set()
            while True:
                await asyncio.sleep(period)
                try:
                    await self.renew(ticket)
                except StoreError:
                    log.warning("lease renewal failed", extra={"lease": ticket.lease.lease_id})
                    continue
                await _checkpoint()

        task = asyncio.get_running_loop().create_task(_loop())
        try:
            yield first_written
        finally:
            task.cancel()

    def _settlement(self, ticket: Ticket, progress: Progress, status: str) -> Settlement:
        subscription = ticket.account.plan is PlanKind.SUBSCRIPTION
        # Validates the counts first: bad counts raise before anything is marked or sent.
        cost = token_cost_pico(ticket.price, progress.prompt_tokens, progress.cached_tokens,
                               progress.completion_tokens, cache_discount=subscription,
                               discount=self.policy.cache_read_discount)
        unserved = (status == "error" and not progress.first_token) or status in UNSERVED_STATUSES
        refund = ticket.lease.weight_units if unserved else 0
        event = UsageEvent(
            ts_ms=self._now_ms(), account_id=ticket.account.id, key_id=ticket.key_id, model=ticket.lease.model,
            prompt_tokens=progress.prompt_tokens, cached_tokens=progress.cached_tokens,
            completion_tokens=progress.completion_tokens, weight_units=ticket.lease.weight_units - refund,
            cost_pico=cost, status="refunded" if refund else status, ttft_ms=progress.ttft_ms,
            duration_ms=int((time.monotonic() - ticket.started_mono) * 1000), lease_id=ticket.lease.lease_id,
            api=ticket.api)
        return Settlement(ticket.lease, cost, refund, event, self.settings.retention_ms)

    def settle(self, ticket: Ticket, *, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
               status: str, first_token: bool, ttft_ms: int | None) -> asyncio.Task[Snapshot | None]:
        """Release the slot, debit the weekly bar, record usage. Safe to await with shield.

        Runs in its own task so a cancelled (disconnected) request still settles.
        """
        if ticket.settled:
            raise RuntimeError("ticket already settled")
        # Bad counts raise here and leave the ticket unsettled, so the caller can still settle it.
        settlement = self._settlement(
            ticket, Progress(prompt_tokens, cached_tokens, completion_tokens, first_token, ttft_ms), status)
        ticket.settled = True
        self.active -= 1
        task = asyncio.get_running_loop().create_task(self._settle(settlement, ticket.checkpointed))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        return task

    async def _settle(self, settlement: Settlement, checkpointed: bool = False) -> Snapshot | None:
        try:
            snapshot = await self.store.settle(settlement, self._clock())
        except StoreError:
            log.warning("store unreachable at settlement; kept in outbox",
                        extra={"lease": settlement.lease.lease_id})
            self.outbox.add(settlement)
            return None
        if self.observer is not None:
            self.observer(snapshot, settlement.event.key_id, None)
        if checkpointed:
            # Best effort: a checkpoint left behind is settled later as a no-op (settle is idempotent).
            with contextlib.suppress(StoreError):
                await self.store.drop_checkpoint(settlement.lease.lease_id)
        return snapshot

    # -- checkpoints: usage a dead gateway owed ---------------------------------

    async def checkpoint(self, ticket: Ticket, progress: Progress) -> None:
        """Keep, in the store, the settlement of `ticket` as it stands, due if this process stops renewing.

        Due a lease TTL plus CHECKPOINT_GRACE_MS after now: long enough that a
        gateway which is alive but lost the store (its final settlement in the
        outbox) settles first, and that a renewal running late never races it.
        """
        if ticket.settled:
            return
        settlement = self._settlement(ticket, progress, "interrupted")
        # Set before the write: a write cancelled in flight may still land, and settling drops what it finds.
        ticket.checkpointed = True
        await self.store.checkpoint(settlement, self.settings.lease_ttl_ms + CHECKPOINT_GRACE_MS, self._clock())

    async def settle_due_checkpoints(self) -> int:
        """Settle the checkpoints whose gateway stopped renewing them (it died); returns how many were due."""
        due = await self.store.due_checkpoints(self._clock())
        for settlement in due:
            applied = await self.store.settle(settlement, self._clock())
            await self.store.drop_checkpoint(settlement.lease.lease_id)
            if applied is None:
                continue  # its gateway settled it and was stopped before it dropped the checkpoint
            event = settlement.event
            log.info("settled the checkpoint of a response whose gateway stopped", extra={
                "lease": settlement.lease.lease_id, "account": event.account_id, "model": event.model,
                "prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens})
        return len(due)

    async def sweep_once(self) -> int | None:
        """One sweep: how many checkpoints were due, or None when it settled nothing on purpose or failed.

        The first sweep after the store was seen away settles nothing: a
        checkpoint can only fall due during an outage longer than
        CHECKPOINT_GRACE_MS, and then the final settlements of the same
        requests wait in live gateways' outboxes (retried every few seconds);
        a period's wait lets them land first, so the exact counts win over a
        checkpoint's "interrupted" ones (a later checkpoint settle is a no-op).
        """
        try:
            if self._store_was_away:
                await self.store.now_ms()
                self._store_was_away = False
                return None
            return await self.settle_due_checkpoints()
        except StoreError:
            self._store_was_away = True
            log.warning("checkpoint sweep failed: store unreachable")
            return None

    async def sweep_checkpoints(self) -> None:
        """Run `sweep_once` every lease TTL, for ever (every gateway runs one; settling is idempotent)."""
        while True:
            await asyncio.sleep(self.settings.lease_ttl_s)
            await self.sweep_once()

    async def snapshot(self, account_id: str) -> Snapshot:
        return await self.store.snapshot(account_id, self._clock())

    def start(self) -> None:
        """Start the background work of a serving process: the outbox's retries and the checkpoint sweep."""
        self.outbox.start()
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self.sweep_checkpoints())

    async def drain(self) -> None:
        """Wait for in-flight settlements; called at shutdown."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)
        await self.outbox.flush()
        await self.outbox.close()


def _retry_s(ms: int | None) -> int | None:
    return None if ms is None else max(1, ceil_seconds(ms))
