"""The embedded store: in-process, persisted to one SQLite file in the data dir.

Why SQLite: every decision is one `BEGIN IMMEDIATE` transaction, so it is
atomic even when the `packserve` CLI edits accounts in another process while
a server runs on the same data directory, and a restart loses nothing. All
SQLite calls run on one dedicated thread so the event loop never blocks on
disk. Queue wake-ups are in-process events: the embedded store serves one
gateway process (use Redis for more).

The rules themselves are the pure functions of `policies`; this module only
loads state, applies them and writes the result back.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from cluster.capacity_book import CapacityBook
from cluster.key_limits import key_bar_specs
from cluster.observations_memory import MemoryObservations
from cluster.records import Account, ApiKey, UsageEvent
from cluster.store import (
    Admitted,
    CapacityOutcome,
    CapacityStats,
    CapacityTerms,
    Lease,
    NotFound,
    Refused,
    ReserveOutcome,
    ReserveRequest,
    Settlement,
    SlotBusy,
    Snapshot,
    StoreError,
)
from policies.admission import (
    Admit,
    Reason,
    check_bars,
    check_key_bars,
    check_spend_cap,
    concurrency_allows,
    month_bounds_ms,
    refund_request,
    settle_weekly,
)
from policies.auth_failures import MAX_SOURCE_LEN, AuthFailures, AuthVerdict, record_failure
from policies.bars import BarSpec, BarState, rescale, settle
from policies.plans import DEFAULT_CATALOG, PlanCatalog, PlanKind, SizeClass
from policies.units import DAY_MS

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, plan TEXT NOT NULL, packs TEXT NOT NULL,
  spend_cap INTEGER, payg_conc INTEGER NOT NULL, suspended INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bars (
  account_id TEXT PRIMARY KEY, rl INTEGER, ra INTEGER, wl INTEGER, wa INTEGER, rc INTEGER, wc INTEGER);
CREATE TABLE IF NOT EXISTS keys (
  id TEXT PRIMARY KEY, account_id TEXT NOT NULL, key_hash TEXT NOT NULL UNIQUE, prefix TEXT NOT NULL,
  created INTEGER NOT NULL, revoked INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS keys_account ON keys(account_id);
CREATE TABLE IF NOT EXISTS leases (
  lease_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, model TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS leases_slot ON leases(account_id, model);
CREATE TABLE IF NOT EXISTS queue (
  seq INTEGER PRIMARY KEY AUTOINCREMENT, waiter_id TEXT NOT NULL UNIQUE, account_id TEXT NOT NULL,
  model TEXT NOT NULL, expires INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS queue_slot ON queue(account_id, model, seq);
CREATE TABLE IF NOT EXISTS usage (
  id INTEGER PRIMARY KEY AUTOINCREMENT, account_id TEXT NOT NULL, ts INTEGER NOT NULL, event BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS usage_account ON usage(account_id, ts);
CREATE TABLE IF NOT EXISTS spend (
  account_id TEXT NOT NULL, month INTEGER NOT NULL, pico INTEGER NOT NULL, PRIMARY KEY(account_id, month));
CREATE TABLE IF NOT EXISTS settled (lease_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, ts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS checkpoints (lease_id TEXT PRIMARY KEY, due INTEGER NOT NULL, settlement BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS checkpoints_due ON checkpoints(due);
CREATE TABLE IF NOT EXISTS alert_state (
  account_id TEXT NOT NULL, name TEXT NOT NULL, fired INTEGER NOT NULL, at INTEGER NOT NULL,
  PRIMARY KEY(account_id, name));
CREATE TABLE IF NOT EXISTS alert_outbox (
  id TEXT PRIMARY KEY, due INTEGER NOT NULL, payload TEXT NOT NULL, attempts INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox(due);
CREATE TABLE IF NOT EXISTS key_bars (
  key_id TEXT PRIMARY KEY, account_id TEXT NOT NULL, rl INTEGER, ra INTEGER, wl INTEGER, wa INTEGER,
  rc INTEGER, wc INTEGER);
"""

SETTLED_MEMORY_MS = DAY_MS
# Columns added after the first release: (table, column, type). rc/wc are the
# capacities the bar levels were recorded against (NULL: the current one).
MIGRATIONS = (("bars", "rc", "INTEGER"), ("bars", "wc", "INTEGER"),
              # Per-key limits (cluster.key_limits): models is a comma-separated allow-list.
              ("keys", "models", "TEXT NOT NULL DEFAULT ''"), ("keys", "expires", "INTEGER"),
              ("keys", "disabled", "INTEGER NOT NULL DEFAULT 0"), ("keys", "max_req", "INTEGER"),
              ("keys", "max_wk", "INTEGER"))
KEY_COLUMNS = "id, account_id, key_hash, prefix, created, revoked, models, expires, disabled, max_req, max_wk"

MAX_TRACKED_SOURCES = 100_000


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class _Waiter:
    def __init__(self, registry: dict[tuple[str, str], set[asyncio.Event]], slot: tuple[str, str]) -> None:
        self._registry = registry
        self._slot = slot
        self.event = asyncio.Event()
        registry.setdefault(slot, set()).add(self.event)

    async def wait(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self.event.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return False
        self.event.clear()
        return True

    def close(self) -> None:
        events = self._registry.get(self._slot)
        if events is not None:
            events.discard(self.event)
            if not events:
                del self._registry[self._slot]


class EmbeddedStore:
    """`path=None` keeps everything in memory (tests); otherwise a SQLite file."""

    def __init__(self, path: Path | None, *, request_unit: int,
                 clock: Callable[[], int] = wall_clock_ms, plans: PlanCatalog = DEFAULT_CATALOG) -> None:
        self._unit = request_unit
        self._plans = plans
        self._clock = clock
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packserve-sqlite")
        self._local = threading.local()
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        # Model capacity lives in memory: it concerns this process's requests only (see capacity_book).
        self._capacity_waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._capacity = CapacityBook(self._wake_capacity)
        self._auth_failures: dict[str, AuthFailures] = {}
        # Heartbeats, refusals and latency samples: in memory, like the capacity (one process).
        self._observations = MemoryObservations(clock)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._executor.submit(self._init_schema).result()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open the embedded store at {path}: {exc}") from exc

    # -- plumbing ---------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            target = ":memory:" if self._path is None else str(self._path)
            conn = sqlite3.connect(target, isolation_level=None, timeout=10.0)
            if self._path is not None:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
        return conn

    def _init_schema(self) -> None:
        conn = self._conn()
        conn.executescript(SCHEMA)
        for table, column, kind in MIGRATIONS:
            if column not in {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    @property
    def plans(self) -> PlanCatalog:
        return self._plans

    @property
    def observations(self) -> MemoryObservations:
        return self._observations

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._executor, fn, *args)
        except sqlite3.Error as exc:
            raise StoreError(f"embedded store error: {exc}") from exc

    def _time(self, now_ms: int | None) -> int:
        return self._clock() if now_ms is None else now_ms

    def _wake(self, account_id: str, model: str) -> None:
        for event in self._waiters.get((account_id, model), ()):
            event.set()

    def _wake_capacity(self, model: str, entry_id: str) -> None:
        for event in self._capacity_waiters.get((model, entry_id), ()):
            event.set()

    async def now_ms(self) -> int:
        return self._clock()

    async def close(self) -> None:
        def _close() -> None:
            conn = getattr(self._local, "conn", None)
            if conn is not None:
                conn.close()
                self._local.conn = None

        await self._run(_close)
        self._executor.shutdown(wait=True)

    # -- accounts ---------------------------------------------------------

    def _account(self, row: Sequence[Any]) -> Account:
        return Account(
            id=row[0], name=row[1], plan=PlanKind(row[2]),
            packs=tuple(p for p in row[3].split(",") if p),
            spend_cap_pico=row[4], payg_concurrency=row[5], suspended=bool(row[6]), created_ms=row[7],
            catalog=self._plans)

    def _get_account(self, conn: sqlite3.Connection, account_id: str) -> Account | None:
        row = conn.execute("SELECT id, name, plan, packs, spend_cap, payg_conc, suspended, created "
                           "FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return None if row is None else self._account(row)

    async def create_account(self, account: Account) -> Account:
        if account.plan is PlanKind.SUBSCRIPTION:
            replace(account, catalog=self._plans).limits()  # refuses 0 or 6 packs, unknown kinds

        def _create() -> Account:
            with self._tx() as conn:
                if self._get_account(conn, account.id) is not None:
                    raise ValueError(f"account {account.id} already exists")
                conn.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                    account.id, account.name, account.plan.value, ",".join(account.packs),
                    account.spend_cap_pico, account.payg_concurrency, int(account.suspended),
                    account.created_ms))
            return replace(account, catalog=self._plans)

        return await self._run(_create)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._run(lambda: self._get_account(self._conn(), account_id))

    async def list_accounts(self) -> list[Account]:
        def _list() -> list[Account]:
            rows = self._conn().execute("SELECT id, name, plan, packs, spend_cap, payg_conc, suspended, created "
                                        "FROM accounts ORDER BY created, id").fetchall()
            return [self._account(r) for r in rows]

        return await self._run(_list)

    async def set_plan(self, account_id: str, plan: PlanKind, packs: Sequence[str],
                       spend_cap_pico: int | None, payg_concurrency: int,
                       now_ms: int | None = None) -> Account:
        now = self._time(now_ms)

        def _set() -> Account:
            with self._tx() as conn:
                old = self._get_account(conn, account_id)
                if old is None:
                    raise NotFound(f"no account {account_id}")
                new = Account(old.id, old.name, plan, tuple(packs), spend_cap_pico, payg_concurrency,
                              old.suspended, old.created_ms, self._plans)
                if plan is PlanKind.SUBSCRIPTION:
                    new.limits()
                    # The change happens now: each bar is settled under its old
                    # capacity, then keeps its remaining fraction (policies.bars.rescale).
                    if old.plan is PlanKind.SUBSCRIPTION:
                        old_r_spec, old_r, old_w_spec, old_w = self._read_bars(conn, old, now)
                        req_spec = new.limits().request_bar(self._unit)
                        wk_spec = new.limits().weekly_bar()
                        self._write_bars(conn, account_id, req_spec, rescale(old_r_spec, req_spec, old_r, now),
                                         wk_spec, rescale(old_w_spec, wk_spec, old_w, now))
                conn.execute("UPDATE accounts SET plan = ?, packs = ?, spend_cap = ?, payg_conc = ? WHERE id = ?",
                             (plan.value, ",".join(packs), spend_cap_pico, payg_concurrency, account_id))
                return new

        return await self._run(_set)

    async def sync_plans(self, apply: bool = True) -> int:
        """Every account's limits are read from the plans as it is used: only check its packs exist."""
        for account in await self.list_accounts():
            if account.plan is PlanKind.SUBSCRIPTION:
                account.limits()
        return 0

    async def set_suspended(self, account_id: str, suspended: bool) -> Account:
        def _set() -> Account:
            with self._tx() as conn:
                cur = conn.execute("UPDATE accounts SET suspended = ? WHERE id = ?", (int(suspended), account_id))
                if cur.rowcount == 0:
                    raise NotFound(f"no account {account_id}")
                account = self._get_account(conn, account_id)
                assert account is not None
                return account

        return await self._run(_set)

    async def delete_account(self, account_id: str) -> bool:
        def _delete() -> bool:
            with self._tx() as conn:
                cur = conn.execute("DELETE FROM accounts WHERE id = ?", (account_id,))
                for table in ("bars", "keys", "key_bars", "leases", "queue", "usage", "spend", "settled",
                              "alert_state"):
                    conn.execute(f"DELETE FROM {table} WHERE account_id = ?", (account_id,))
                return cur.rowcount > 0

        self._capacity.forget_account(account_id)
        await self._observations.forget_account(account_id)
        return await self._run(_delete)

    # -- keys -------------------------------------------------------------

    @staticmethod
    def _key(row: Sequence[Any]) -> ApiKey:
        return ApiKey(id=row[0], account_id=row[1], key_hash=row[2], prefix=row[3], created_ms=row[4],
                      revoked=bool(row[5]), models=tuple(m for m in (row[6] or "").split(",") if m),
                      expires_ms=row[7], disabled=bool(row[8]), max_requests=row[9], max_weekly_pico=row[10])

    async def create_key(self, key: ApiKey) -> ApiKey:
        def _create() -> ApiKey:
            with self._tx() as conn:
                if self._get_account(conn, key.account_id) is None:
                    raise NotFound(f"no account {key.account_id}")
                conn.execute(f"INSERT INTO keys ({KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                             (key.id, key.account_id, key.key_hash, key.prefix, key.created_ms, int(key.revoked),
                              ",".join(key.models), key.expires_ms, int(key.disabled), key.max_requests,
                              key.max_weekly_pico))
            return key

        return await self._run(_create)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        def _find() -> ApiKey | None:
            row = self._conn().execute(f"SELECT {KEY_COLUMNS} FROM keys "
                                       "WHERE key_hash = ? AND revoked = 0", (key_hash,)).fetchone()
            return None if row is None else self._key(row)

        return await self._run(_find)

    async def list_keys(self, account_id: str) -> list[ApiKey]:
        def _list() -> list[ApiKey]:
            rows = self._conn().execute(f"SELECT {KEY_COLUMNS} FROM keys "
                                        "WHERE account_id = ? ORDER BY created, id", (account_id,)).fetchall()
            return [self._key(r) for r in rows]

        return await self._run(_list)

    async def revoke_key(self, key_id: str) -> bool:
        def _revoke() -> bool:
            with self._tx() as conn:
                return conn.execute("UPDATE keys SET revoked = 1 WHERE id = ? AND revoked = 0",
                                    (key_id,)).rowcount > 0

        return await self._run(_revoke)

    # -- usage alerts -------------------------------------------------------

    async def claim_alert(self, account_id: str, name: str, above: bool, now_ms: int, alert_id: str,
                          payload: str) -> bool:
        """As alert_claim.lua: once per crossing; an observation older than the last transition changes nothing."""
        def _claim() -> bool:
            with self._tx() as conn:
                row = conn.execute("SELECT fired, at FROM alert_state WHERE account_id = ? AND name = ?",
                                   (account_id, name)).fetchone()
                fired, at = (bool(row[0]), int(row[1])) if row else (False, 0)
                if now_ms < at or fired == above:
                    return False
                conn.execute("INSERT OR REPLACE INTO alert_state VALUES (?, ?, ?, ?)",
                             (account_id, name, int(above), now_ms))
                if above:
                    conn.execute("INSERT INTO alert_outbox VALUES (?, ?, ?, 0)", (alert_id, now_ms, payload))
                return above

        return await self._run(_claim)

    async def take_alerts(self, now_ms: int, limit: int, backoff_base_ms: int,
                          backoff_cap_ms: int) -> list[tuple[str, str, int]]:
        def _take() -> list[tuple[str, str, int]]:
            with self._tx() as conn:
                rows = conn.execute("SELECT id, payload, attempts FROM alert_outbox WHERE due <= ? ORDER BY due "
                                    "LIMIT ?", (now_ms, limit)).fetchall()
                out = []
                for alert_id, payload, attempts in rows:
                    tries = int(attempts) + 1
                    delay = min(backoff_base_ms * 2 ** (tries - 1), backoff_cap_ms)
                    conn.execute("UPDATE alert_outbox SET attempts = ?, due = ? WHERE id = ?",
                                 (tries, now_ms + delay, alert_id))
                    out.append((str(alert_id), str(payload), tries))
                return out

        return await self._run(_take)

    async def alert_done(self, alert_id: str) -> None:
        def _done() -> None:
            with self._tx() as conn:
                conn.execute("DELETE FROM alert_outbox WHERE id = ?", (alert_id,))

        await self._run(_done)

    async def update_key(self, key: ApiKey) -> bool:
        def _update() -> bool:
            with self._tx() as conn:
                return conn.execute(
                    "UPDATE keys SET models = ?, expires = ?, disabled = ?, max_req = ?, max_wk = ? "
                    "WHERE id = ? AND revoked = 0",
                    (",".join(key.models), key.expires_ms, int(key.disabled), key.max_requests,
                     key.max_weekly_pico, key.id)).rowcount > 0

        return await self._run(_update)

    def _key_bars(self, conn: sqlite3.Connection, account: Account, key_id: str,
                  now: int) -> tuple[BarSpec | None, BarState | None, BarSpec | None, BarState | None]:
        """A capped key's own bars, settled to `now` (carried over if its caps changed)."""
        if not key_id:
            return None, None, None, None
        row = conn.execute(f"SELECT {KEY_COLUMNS} FROM keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            return None, None, None, None
        limits = account.limits()
        req_spec, wk_spec = key_bar_specs(self._key(row), limits, self._unit)
        if req_spec is None and wk_spec is None:
            return None, None, None, None
        bars = conn.execute("SELECT rl, ra, wl, wa, rc, wc FROM key_bars WHERE key_id = ?", (key_id,)).fetchone()
        bars = bars or (None,) * 6
        req = None if req_spec is None else self._carried(req_spec, bars[0], bars[1], bars[4],
                                                          limits.request_schedule.spec, now)
        wk = None if wk_spec is None else self._carried(wk_spec, bars[2], bars[3], bars[5],
                                                        limits.weekly_schedule.spec, now)
        return req_spec, req, wk_spec, wk

    @staticmethod
    def _write_key_bars(conn: sqlite3.Connection, account_id: str, key_id: str, req_spec: BarSpec | None,
                        req: BarState | None, wk_spec: BarSpec | None, wk: BarState | None) -> None:
        def level(state: BarState | None) -> int | None:
            return None if state is None or state.anchor_ms is None else state.level

        conn.execute("INSERT OR REPLACE INTO key_bars VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
            key_id, account_id, level(req), None if req is None else req.anchor_ms,
            level(wk), None if wk is None else wk.anchor_ms,
            None if req_spec is None else req_spec.capacity, None if wk_spec is None else wk_spec.capacity))

    # -- bars -------------------------------------------------------------

    def _read_bars(self, conn: sqlite3.Connection, account: Account,
                   now: int) -> tuple[BarSpec, BarState, BarSpec, BarState]:
        """Both bars under the account's current capacities, settled to `now`.

        A level recorded against another capacity (the plans were edited, or
        the reference price changed) is carried over by `rescale` first.
        """
        limits = account.limits()
        req_spec, wk_spec = limits.request_bar(self._unit), limits.weekly_bar()
        row = conn.execute("SELECT rl, ra, wl, wa, rc, wc FROM bars WHERE account_id = ?",
                           (account.id,)).fetchone()
        if row is None:
            return req_spec, BarState.full(req_spec), wk_spec, BarState.full(wk_spec)

        req = self._carried(req_spec, row[0], row[1], row[4], limits.request_schedule.spec, now)
        wk = self._carried(wk_spec, row[2], row[3], row[5], limits.weekly_schedule.spec, now)
        return req_spec, req, wk_spec, wk

    @staticmethod
    def _carried(spec: BarSpec, level: int | None, anchor: int | None, recorded: int | None,
                 schedule_spec: Callable[[int], BarSpec], now: int) -> BarState:
        """A stored bar under `spec`, settled to `now`; a level recorded against another capacity is rescaled."""
        if level is None:
            return BarState.full(spec)
        state = BarState(level, anchor)
        if recorded is None or recorded == spec.capacity:
            return settle(spec, state, now)
        return rescale(schedule_spec(recorded), spec, state, now)

    @staticmethod
    def _write_bars(conn: sqlite3.Connection, account_id: str, req_spec: BarSpec, req: BarState,
                    wk_spec: BarSpec, wk: BarState) -> None:
        # NULL level = full: a full bar stays full whatever the capacity becomes.
        conn.execute("INSERT OR REPLACE INTO bars VALUES (?, ?, ?, ?, ?, ?, ?)", (
            account_id,
            None if req.anchor_ms is None else req.level, req.anchor_ms,
            None if wk.anchor_ms is None else wk.level, wk.anchor_ms,
            req_spec.capacity, wk_spec.capacity))

    def _month_spend(self, conn: sqlite3.Connection, account_id: str, now_ms: int) -> int:
        row = conn.execute("SELECT pico FROM spend WHERE account_id = ? AND month = ?",
                           (account_id, month_id(now_ms))).fetchone()
        return 0 if row is None else int(row[0])

    def _snapshot_tx(self, conn: sqlite3.Connection, account: Account, now: int) -> Snapshot:
        if account.plan is PlanKind.PAYG:
            return Snapshot(account, now, month_spend_pico=self._month_spend(conn, account.id, now))
        req_spec, req, wk_spec, wk = self._read_bars(conn, account, now)
        return Snapshot(account, now, req_spec, req, wk_spec, wk)

    async def snapshot(self, account_id: str, now_ms: int | None = None) -> Snapshot:
        now = self._time(now_ms)

        def _snap() -> Snapshot:
            conn = self._conn()
            account = self._get_account(conn, account_id)
            if account is None:
                raise NotFound(f"no account {account_id}")
            return self._snapshot_tx(conn, account, now)

        return await self._run(_snap)

    # -- admission --------------------------------------------------------

    async def reserve(self, request: ReserveRequest, now_ms: int | None = None) -> ReserveOutcome:
        now = self._time(now_ms)
        return await self._run(self._reserve_tx, request, now)

    def _reserve_tx(self, r: ReserveRequest, now: int) -> ReserveOutcome:
        with self._tx() as conn:
            account = self._get_account(conn, r.account_id)
            if account is None:
                raise NotFound(f"no account {r.account_id}")
            conn.execute("DELETE FROM leases WHERE account_id = ? AND model = ? AND expires <= ?",
                         (r.account_id, r.model, now))
            conn.execute("DELETE FROM queue WHERE account_id = ? AND model = ? AND expires <= ?",
                         (r.account_id, r.model, now))
            snap = self._snapshot_tx(conn, account, now)
            if account.suspended:
                return Refused(Reason.ACCOUNT_SUSPENDED, None, snap)
            req_after: BarState | None = None
            key_after: tuple[BarSpec | None, BarState | None, BarSpec | None, BarState | None] | None = None
            if account.plan is PlanKind.PAYG:
                refusal = check_spend_cap(snap.month_spend_pico, account.spend_cap_pico, now)
                if refusal is not None:
                    return Refused(refusal.reason, refusal.retry_after_ms, snap)
            elif r.size_class is not SizeClass.UNMETERED:
                assert snap.request_spec and snap.request and snap.weekly_spec and snap.weekly
                decision = check_bars(snap.request_spec, snap.request, snap.weekly_spec, snap.weekly,
                                      r.weight_units, now)
                if not isinstance(decision, Admit):
                    return Refused(decision.reason, decision.retry_after_ms, snap)
                req_after = decision.request
                key_req_spec, key_req, key_wk_spec, key_wk = self._key_bars(conn, account, r.key_id, now)
                if key_req_spec is not None or key_wk_spec is not None:
                    key_decision = check_key_bars(key_req_spec, key_req, key_wk_spec, key_wk, r.weight_units, now)
                    if not isinstance(key_decision, Admit):
                        return Refused(key_decision.reason, key_decision.retry_after_ms, snap)
                    key_after = (key_req_spec, key_decision.request if key_req_spec else None, key_wk_spec, key_wk)

            limit = account.concurrency(r.size_class)
            active, earliest = conn.execute(
                "SELECT COUNT(*), MIN(expires) FROM leases WHERE account_id = ? AND model = ?",
                (r.account_id, r.model)).fetchone()
            queue = [row[0] for row in conn.execute(
                "SELECT waiter_id FROM queue WHERE account_id = ? AND model = ? ORDER BY seq",
                (r.account_id, r.model))]
            ahead = queue.index(r.waiter_id) if r.waiter_id in queue else len(queue)
            if not concurrency_allows(active, limit, ahead):
                position = -1
                if r.waiter_id is not None:
                    if r.waiter_id in queue:
                        conn.execute("UPDATE queue SET expires = ? WHERE waiter_id = ?",
                                     (now + r.waiter_ttl_ms, r.waiter_id))
                    else:
                        conn.execute("INSERT INTO queue (waiter_id, account_id, model, expires) VALUES (?, ?, ?, ?)",
                                     (r.waiter_id, r.account_id, r.model, now + r.waiter_ttl_ms))
                    position = ahead
                return SlotBusy(earliest, position)

            if r.waiter_id is not None:
                conn.execute("DELETE FROM queue WHERE waiter_id = ?", (r.waiter_id,))
            lease = Lease(r.lease_id, r.account_id, r.model, r.weight_units, now, now + r.lease_ttl_ms)
            conn.execute("INSERT INTO leases VALUES (?, ?, ?, ?)", (lease.lease_id, r.account_id, r.model,
                                                                    lease.expires_ms))
            if req_after is not None:
                assert snap.request_spec is not None and snap.weekly_spec is not None and snap.weekly is not None
                self._write_bars(conn, r.account_id, snap.request_spec, req_after, snap.weekly_spec, snap.weekly)
                snap = Snapshot(account, now, snap.request_spec, req_after, snap.weekly_spec, snap.weekly)
            if key_after is not None:
                self._write_key_bars(conn, r.account_id, r.key_id, *key_after)
            return Admitted(lease, snap)

    async def leave_queue(self, account_id: str, model: str, waiter_id: str) -> None:
        def _leave() -> None:
            with self._tx() as conn:
                conn.execute("DELETE FROM queue WHERE waiter_id = ?", (waiter_id,))

        await self._run(_leave)
        # The waiter behind us may now be first in line.
        self._wake(account_id, model)

    async def renew(self, lease: Lease, ttl_ms: int, now_ms: int | None = None) -> bool:
        now = self._time(now_ms)

        def _renew() -> bool:
            with self._tx() as conn:
                return conn.execute("UPDATE leases SET expires = ? WHERE lease_id = ? AND expires > ?",
                                    (now + ttl_ms, lease.lease_id, now)).rowcount > 0

        return await self._run(_renew)

    async def checkpoint(self, settlement: Settlement, ttl_ms: int, now_ms: int | None = None) -> None:
        now = self._time(now_ms)

        def _checkpoint() -> None:
            with self._tx() as conn:
                conn.execute("INSERT INTO checkpoints VALUES (?, ?, ?) ON CONFLICT(lease_id) "
                             "DO UPDATE SET due = excluded.due, settlement = excluded.settlement",
                             (settlement.lease.lease_id, now + ttl_ms, settlement.encode()))

        await self._run(_checkpoint)

    async def due_checkpoints(self, now_ms: int | None = None, limit: int = 100) -> list[Settlement]:
        now = self._time(now_ms)

        def _due() -> list[bytes]:
            rows = self._conn().execute("SELECT settlement FROM checkpoints WHERE due <= ? ORDER BY due LIMIT ?",
                                        (now, limit)).fetchall()
            return [row[0] for row in rows]

        return [Settlement.decode(blob) for blob in await self._run(_due)]

    async def drop_checkpoint(self, lease_id: str) -> None:
        def _drop() -> None:
            with self._tx() as conn:
                conn.execute("DELETE FROM checkpoints WHERE lease_id = ?", (lease_id,))

        await self._run(_drop)

    async def record_auth_failure(self, source: str, limit: int, window_ms: int,
                                  now_ms: int | None = None) -> AuthVerdict:
        """In-process: the embedded store serves one gateway process, so no other one needs the count."""
        now = self._time(now_ms)
        if len(self._auth_failures) > MAX_TRACKED_SOURCES:
            # A flood of distinct addresses: forget the windows already over rather than grow without bound.
            current = now // window_ms
            self._auth_failures = {s: f for s, f in self._auth_failures.items() if f.window == current}
        source = source[:MAX_SOURCE_LEN]
        state, verdict = record_failure(self._auth_failures.get(source), now, limit, window_ms)
        self._auth_failures[source] = state
        return verdict

    async def settle(self, settlement: Settlement, now_ms: int | None = None) -> Snapshot | None:
        now = self._time(now_ms)
        snap = await self._run(self._settle_tx, settlement, now)
        self._wake(settlement.lease.account_id, settlement.lease.model)
        return snap

    def _settle_tx(self, s: Settlement, now: int) -> Snapshot | None:
        lease = s.lease
        with self._tx() as conn:
            account = self._get_account(conn, lease.account_id)
            conn.execute("DELETE FROM leases WHERE lease_id = ?", (lease.lease_id,))
            if account is None:
                return None
            conn.execute("DELETE FROM settled WHERE account_id = ? AND ts < ?",
                         (account.id, now - SETTLED_MEMORY_MS))
            first = conn.execute("INSERT OR IGNORE INTO settled VALUES (?, ?, ?)",
                                 (lease.lease_id, account.id, now)).rowcount > 0
            if first:
                if account.plan is PlanKind.PAYG:
                    conn.execute("INSERT INTO spend VALUES (?, ?, ?) ON CONFLICT(account_id, month) "
                                 "DO UPDATE SET pico = pico + excluded.pico",
                                 (account.id, month_id(now), s.cost_pico))
                else:
                    req_spec, req, wk_spec, wk = self._read_bars(conn, account, now)
                    wk = settle_weekly(wk_spec, wk, s.cost_pico, now)
                    req = refund_request(req_spec, req, s.refund_units, now) if s.refund_units \
                        else settle(req_spec, req, now)
                    self._write_bars(conn, account.id, req_spec, req, wk_spec, wk)
                    key_id = s.event.key_id
                    k_req_spec, k_req, k_wk_spec, k_wk = self._key_bars(conn, account, key_id, now)
                    if k_wk_spec is not None and k_wk is not None:
                        k_wk = settle_weekly(k_wk_spec, k_wk, s.cost_pico, now)
                    if k_req_spec is not None and k_req is not None and s.refund_units:
                        k_req = refund_request(k_req_spec, k_req, s.refund_units, now)
                    if k_req_spec is not None or k_wk_spec is not None:
                        self._write_key_bars(conn, account.id, key_id, k_req_spec, k_req, k_wk_spec, k_wk)
                conn.execute("INSERT INTO usage (account_id, ts, event) VALUES (?, ?, ?)",
                             (account.id, s.event.ts_ms, s.event.encode()))
                conn.execute("DELETE FROM usage WHERE account_id = ? AND ts < ?",
                             (account.id, now - s.retention_ms))
            return self._snapshot_tx(conn, account, now)

    async def active_leases(self, account_id: str, model: str, now_ms: int | None = None) -> int:
        now = self._time(now_ms)

        def _count() -> int:
            row = self._conn().execute("SELECT COUNT(*) FROM leases WHERE account_id = ? AND model = ? "
                                       "AND expires > ?", (account_id, model, now)).fetchone()
            return int(row[0])

        return await self._run(_count)

    def slot_waiter(self, account_id: str, model: str) -> _Waiter:
        return _Waiter(self._waiters, (account_id, model))

    # -- model capacity (in memory, on the event loop: each call is one step) ----

    async def capacity_acquire(self, terms: CapacityTerms, account_id: str, entry_id: str, wait_ttl_ms: int,
                               now_ms: int | None = None, *, join: bool = True) -> CapacityOutcome:
        return self._capacity.acquire(terms, account_id, entry_id, wait_ttl_ms, self._time(now_ms), join=join)

    async def capacity_renew(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                             now_ms: int | None = None) -> bool:
        return self._capacity.renew(terms, entry_id, counter_total, self._time(now_ms))

    async def capacity_release(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                               now_ms: int | None = None) -> bool:
        return self._capacity.release(terms, entry_id, counter_total, self._time(now_ms))

    async def capacity_stats(self, terms: CapacityTerms, now_ms: int | None = None) -> CapacityStats:
        return self._capacity.stats(terms, self._time(now_ms))

    def capacity_waiter(self, model: str, entry_id: str) -> _Waiter:
        return _Waiter(self._capacity_waiters, (model, entry_id))

    # -- usage ------------------------------------------------------------

    async def usage(self, account_id: str, since_ms: int = 0, until_ms: int | None = None) -> list[UsageEvent]:
        until = until_ms if until_ms is not None else 2**62

        def _usage() -> list[UsageEvent]:
            rows = self._conn().execute("SELECT event FROM usage WHERE account_id = ? AND ts >= ? AND ts < ? "
                                        "ORDER BY ts, id", (account_id, since_ms, until)).fetchall()
            return [UsageEvent.decode(r[0]) for r in rows]

        return await self._run(_usage)

    async def purge_usage(self, before_ms: int) -> int:
        def _purge() -> int:
            with self._tx() as conn:
                return conn.execute("DELETE FROM usage WHERE ts < ?", (before_ms,)).rowcount

        return await self._run(_purge)


def month_id(now_ms: int) -> int:
    """The calendar month (UTC) a payg spend counts toward, as the month's start in ms."""
    return month_bounds_ms(now_ms)[0]
