"""The admission store interface, implemented by the embedded and Redis stores.

Every method that decides or changes bars is one atomic step in the store
(one Lua script on Redis, one SQLite transaction embedded), so any number of
gateways sharing a store agree. `now_ms=None` means "the store's own clock"
(Redis TIME), so gateways with skewed clocks still agree; tests pass a time.

Both stores pass the same contract tests (tests/test_store_contract.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import msgpack

from cluster.observations import Observations
from cluster.records import Account, ApiKey, UsageEvent
from policies.admission import Reason
from policies.auth_failures import AuthVerdict
from policies.bars import BarSpec, BarState
from policies.fairness import SchedulerMode
from policies.plans import PlanCatalog, PlanKind, SizeClass


class StoreError(Exception):
    """The store cannot be reached or answered something unusable."""


class NotFound(KeyError):
    """An account or key that does not exist."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


@dataclass(frozen=True)
class Snapshot:
    """Both bars of one account at one instant, already settled to `now_ms`."""

    account: Account
    now_ms: int
    request_spec: BarSpec | None = None
    request: BarState | None = None
    weekly_spec: BarSpec | None = None
    weekly: BarState | None = None
    month_spend_pico: int = 0  # payg: spend in the current calendar month


@dataclass(frozen=True)
class ReserveRequest:
    account_id: str
    model: str
    size_class: SizeClass
    weight_units: int  # 0 for unmetered models: no bar is checked or charged
    lease_id: str
    lease_ttl_ms: int
    waiter_id: str | None = None  # join the FIFO queue when no slot is free
    waiter_ttl_ms: int = 0  # a dead waiter stops blocking others after this
    key_id: str = ""  # the API key's own caps (cluster.key_limits) are checked too


@dataclass(frozen=True)
class Lease:
    lease_id: str
    account_id: str
    model: str
    weight_units: int
    admitted_ms: int
    expires_ms: int


@dataclass(frozen=True)
class Admitted:
    lease: Lease
    snapshot: Snapshot


@dataclass(frozen=True)
class Refused:
    reason: Reason
    retry_after_ms: int | None
    snapshot: Snapshot | None


@dataclass(frozen=True)
class SlotBusy:
    """No free slot (or others queued first). Nothing was charged."""

    wake_at_ms: int | None  # earliest lease expiry: re-check then even without a wake-up
    position: int  # 0-based place in the queue, or -1 when not queued


ReserveOutcome = Admitted | Refused | SlotBusy


@dataclass(frozen=True)
class Settlement:
    lease: Lease
    cost_pico: int
    refund_units: int  # weight to give back (failure before the first token), else 0
    event: UsageEvent
    retention_ms: int

    def encode(self) -> bytes:
        """msgpack positional array, as UsageEvent: how a checkpoint keeps it in the store."""
        lease = self.lease
        packed: bytes = msgpack.packb([
            1, lease.lease_id, lease.account_id, lease.model, lease.weight_units, lease.admitted_ms,
            lease.expires_ms, self.cost_pico, self.refund_units, self.event.encode(), self.retention_ms])
        return packed

    @staticmethod
    def decode(blob: bytes) -> Settlement:
        row = msgpack.unpackb(blob)
        if not isinstance(row, list) or not row or row[0] != 1:
            raise ValueError("unknown settlement encoding")
        return Settlement(Lease(*row[1:7]), row[7], row[8], UsageEvent.decode(row[9]), row[10])


@dataclass(frozen=True)
class CapacityTerms:
    """How the calling gateway sees one model: sequences it can run at once, the order, the lease TTL.

    `preempt` (fair mode only): a full model may dispatch one request more
    than its capacity, for an account with nothing running, while the engine
    pauses a sequence of the account named in the grant (policies.fairness).
    """

    model: str
    capacity: int
    mode: SchedulerMode
    lease_ttl_ms: int
    preempt: bool = False

    @property
    def preempts(self) -> bool:
        """Whether this model's store may dispatch over its capacity: `preempt`, in fair mode only."""
        return self.preempt and self.mode is SchedulerMode.FAIR


@dataclass(frozen=True)
class CapacityGranted:
    """Dispatched: the request holds one of the model's sequences until `expires_ms` unless renewed.

    `preempt`: dispatched over a full model; the engine makes room by pausing
    a running sequence of this account.
    """

    expires_ms: int
    preempt: str | None = None


@dataclass(frozen=True)
class CapacityWaiting:
    waiting: int  # requests waiting for this model (all gateways)
    wake_at_ms: int | None  # earliest lease expiry: re-check then even without a wake-up


@dataclass(frozen=True)
class CapacityGone:
    """Asked again (not joining) for an entry the model no longer holds: it left or its wait expired."""


CapacityOutcome = CapacityGranted | CapacityWaiting | CapacityGone


@dataclass(frozen=True)
class AccountLoad:
    account_id: str
    counter: int  # virtual token counter, in policies.fairness counter units
    running: int
    waiting: int


@dataclass(frozen=True)
class CapacityStats:
    model: str
    capacity: int
    in_flight: int
    waiting: int
    accounts: tuple[AccountLoad, ...]  # the active ones (waiting or running), lowest counter first


class SlotWaiter(Protocol):
    """Woken when a slot for (account, model) may have freed up."""

    async def wait(self, timeout_s: float) -> bool: ...

    def close(self) -> None: ...


class Store(Protocol):
    # The operator's plans: pack kinds and both bars' schedules. An account's
    # bar capacities follow it; a level recorded against another capacity (a
    # pack change, an edited plan, a new reference price) is carried over by
    # policies.bars.rescale, which keeps the remaining fraction.
    @property
    def plans(self) -> PlanCatalog: ...

    async def now_ms(self) -> int: ...

    # What the gateways saw lately, for the console: live gateways, refusals,
    # latency samples (cluster/observations.py), shared like everything else.
    @property
    def observations(self) -> Observations: ...

    # accounts
    async def create_account(self, account: Account) -> Account: ...
    async def get_account(self, account_id: str) -> Account | None: ...
    async def list_accounts(self) -> list[Account]: ...
    async def set_plan(self, account_id: str, plan: PlanKind, packs: Sequence[str],
                       spend_cap_pico: int | None, payg_concurrency: int, now_ms: int | None = None) -> Account: ...
    async def set_suspended(self, account_id: str, suspended: bool) -> Account: ...
    # Called when a gateway opens the store: applies edited pack kinds to the
    # accounts holding them (not with apply=False); raises PlanError for a pack
    # kind the plans lack.
    async def sync_plans(self, apply: bool = True) -> int: ...
    async def delete_account(self, account_id: str) -> bool: ...

    # keys
    async def create_key(self, key: ApiKey) -> ApiKey: ...
    async def find_key(self, key_hash: str) -> ApiKey | None: ...
    async def list_keys(self, account_id: str) -> list[ApiKey]: ...
    async def revoke_key(self, key_id: str) -> bool: ...
    # Replace a key's limits (same id and hash); False if unknown or revoked.
    async def update_key(self, key: ApiKey) -> bool: ...

    # admission
    async def reserve(self, request: ReserveRequest, now_ms: int | None = None) -> ReserveOutcome: ...
    async def leave_queue(self, account_id: str, model: str, waiter_id: str) -> None: ...
    async def renew(self, lease: Lease, ttl_ms: int, now_ms: int | None = None) -> bool: ...
    async def settle(self, settlement: Settlement, now_ms: int | None = None) -> Snapshot | None: ...
    async def snapshot(self, account_id: str, now_ms: int | None = None) -> Snapshot: ...
    # Checkpoints: what to settle for a lease if its gateway dies mid-response.
    # `checkpoint` keeps (or replaces) the settlement of `settlement.lease`,
    # due `ttl_ms` from now unless replaced again; `due_checkpoints` returns
    # the ones past due (their gateway stopped renewing); `drop_checkpoint`
    # forgets one. Settling a due checkpoint is the ordinary, idempotent
    # `settle`: a lease already settled is charged nothing twice.
    async def checkpoint(self, settlement: Settlement, ttl_ms: int, now_ms: int | None = None) -> None: ...
    async def due_checkpoints(self, now_ms: int | None = None, limit: int = 100) -> list[Settlement]: ...
    async def drop_checkpoint(self, lease_id: str) -> None: ...
    async def active_leases(self, account_id: str, model: str, now_ms: int | None = None) -> int: ...
    def slot_waiter(self, account_id: str, model: str) -> SlotWaiter: ...

    # model capacity (SPEC §4): one atomic step per decision, shared by every gateway.
    # `capacity_acquire` joins the model's wait (or is dispatched at once) and,
    # asked again with the same entry id and `join=False`, returns the grant
    # once the entry has one, or CapacityGone if the entry is no longer there
    # (released, or dropped as a dead waiter): a late ask from a wait that was
    # cancelled must never put back an entry its release took out;
    # `capacity_renew` extends a dispatched entry's lease and grows its
    # account's counter to `counter_total` (a running total for the entry);
    # `capacity_release` takes the entry out (finished or gave up), counting
    # `counter_total`. Every one of them first drops expired leases and dead
    # waiters and dispatches waiting entries onto free sequences.
    async def capacity_acquire(self, terms: CapacityTerms, account_id: str, entry_id: str, wait_ttl_ms: int,
                               now_ms: int | None = None, *, join: bool = True) -> CapacityOutcome: ...
    async def capacity_renew(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                             now_ms: int | None = None) -> bool: ...
    async def capacity_release(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                               now_ms: int | None = None) -> bool: ...
    async def capacity_stats(self, terms: CapacityTerms, now_ms: int | None = None) -> CapacityStats: ...
    def capacity_waiter(self, model: str, entry_id: str) -> SlotWaiter:
        """Woken when the entry is dispatched. Register before the first `capacity_acquire`."""
        ...

    # usage alerts (cluster.alerts): `claim_alert` fires a crossing once (queueing
    # its payload) or re-arms it; `take_alerts` hands out due alerts and pushes
    # each one's next try back by the backoff; `alert_done` forgets a delivered one.
    async def claim_alert(self, account_id: str, name: str, above: bool, now_ms: int, alert_id: str,
                          payload: str) -> bool: ...
    async def take_alerts(self, now_ms: int, limit: int, backoff_base_ms: int,
                          backoff_cap_ms: int) -> list[tuple[str, str, int]]: ...
    async def alert_done(self, alert_id: str) -> None: ...

    # abuse: one failed authentication from `source` (an address), counted across gateways
    async def record_auth_failure(self, source: str, limit: int, window_ms: int,
                                  now_ms: int | None = None) -> AuthVerdict: ...

    # usage
    async def usage(self, account_id: str, since_ms: int = 0, until_ms: int | None = None) -> list[UsageEvent]: ...
    async def purge_usage(self, before_ms: int) -> int: ...

    async def close(self) -> None: ...
