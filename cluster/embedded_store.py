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
from pathlib import Path
from typing import Any, TypeVar

from cluster.records import Account, ApiKey, UsageEvent
from cluster.store import (
    Admitted,
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
    check_spend_cap,
    concurrency_allows,
    month_bounds_ms,
    refund_request,
    settle_weekly,
)
from policies.auth_failures import MAX_SOURCE_LEN, AuthFailures, AuthVerdict, record_failure
from policies.bars import BarSpec, BarState, settle
from policies.plans import PackKind, PlanKind, SizeClass
from policies.units import DAY_MS

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, plan TEXT NOT NULL, packs TEXT NOT NULL,
  spend_cap INTEGER, payg_conc INTEGER NOT NULL, suspended INTEGER NOT NULL, created INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS bars (
  account_id TEXT PRIMARY KEY, rl INTEGER, ra INTEGER, wl INTEGER, wa INTEGER);
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
"""

SETTLED_MEMORY_MS = DAY_MS
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
                 clock: Callable[[], int] = wall_clock_ms) -> None:
        self._unit = request_unit
        self._clock = clock
        self._path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="packserve-sqlite")
        self._local = threading.local()
        self._waiters: dict[tuple[str, str], set[asyncio.Event]] = {}
        self._auth_failures: dict[str, AuthFailures] = {}
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
        self._conn().executescript(SCHEMA)

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

    @staticmethod
    def _account(row: Sequence[Any]) -> Account:
        return Account(
            id=row[0], name=row[1], plan=PlanKind(row[2]),
            packs=tuple(PackKind(p) for p in row[3].split(",") if p),
            spend_cap_pico=row[4], payg_concurrency=row[5], suspended=bool(row[6]), created_ms=row[7])

    def _get_account(self, conn: sqlite3.Connection, account_id: str) -> Account | None:
        row = conn.execute("SELECT id, name, plan, packs, spend_cap, payg_conc, suspended, created "
                           "FROM accounts WHERE id = ?", (account_id,)).fetchone()
        return None if row is None else self._account(row)

    async def create_account(self, account: Account) -> Account:
        if account.plan is PlanKind.SUBSCRIPTION:
            account.limits()  # refuses 0 or 6 packs before anything is written

        def _create() -> Account:
            with self._tx() as conn:
                if self._get_account(conn, account.id) is not None:
                    raise ValueError(f"account {account.id} already exists")
                conn.execute("INSERT INTO accounts VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (
                    account.id, account.name, account.plan.value, ",".join(p.value for p in account.packs),
                    account.spend_cap_pico, account.payg_concurrency, int(account.suspended),
                    account.created_ms))
            return account

        return await self._run(_create)

    async def get_account(self, account_id: str) -> Account | None:
        return await self._run(lambda: self._get_account(self._conn(), account_id))

    async def list_accounts(self) -> list[Account]:
        def _list() -> list[Account]:
            rows = self._conn().execute("SELECT id, name, plan, packs, spend_cap, payg_conc, suspended, created "
                                        "FROM accounts ORDER BY created, id").fetchall()
            return [self._account(r) for r in rows]

        return await self._run(_list)

    async def set_plan(self, account_id: str, plan: PlanKind, packs: Sequence[PackKind],
                       spend_cap_pico: int | None, payg_concurrency: int,
                       now_ms: int | None = None) -> Account:
        now = self._time(now_ms)

        def _set() -> Account:
            with self._tx() as conn:
                old = self._get_account(conn, account_id)
                if old is None:
                    raise NotFound(f"no account {account_id}")
                new = Account(old.id, old.name, plan, tuple(packs), spend_cap_pico, payg_concurrency,
                              old.suspended, old.created_ms)
                if plan is PlanKind.SUBSCRIPTION:
                    new.limits()
                    # Levels carry over; a bar above its new capacity is clamped, and a
                    # bar now below a larger capacity starts its tick clock now.
                    snap = self._snapshot_tx(conn, old, now) if old.plan is PlanKind.SUBSCRIPTION else None
                    if snap is not None and snap.request is not None and snap.weekly is not None:
                        req_spec = new.limits().request_bar(self._unit)
                        wk_spec = new.limits().weekly_bar()
                        was_full_r = snap.request.anchor_ms is None
                        was_full_w = snap.weekly.anchor_ms is None
                        r = BarState.full(req_spec) if was_full_r else settle(req_spec, snap.request, now)
                        w = BarState.full(wk_spec) if was_full_w else settle(wk_spec, snap.weekly, now)
                        self._write_bars(conn, account_id, r, w)
                conn.execute("UPDATE accounts SET plan = ?, packs = ?, spend_cap = ?, payg_conc = ? WHERE id = ?",
                             (plan.value, ",".join(p.value for p in packs), spend_cap_pico, payg_concurrency,
                              account_id))
                return new

        return await self._run(_set)

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
                for table in ("bars", "keys", "leases", "queue", "usage", "spend", "settled"):
                    conn.execute(f"DELETE FROM {table} WHERE account_id = ?", (account_id,))
                return cur.rowcount > 0

        return await self._run(_delete)

    # -- keys -------------------------------------------------------------

    @staticmethod
    def _key(row: Sequence[Any]) -> ApiKey:
        return ApiKey(id=row[0], account_id=row[1], key_hash=row[2], prefix=row[3], created_ms=row[4],
                      revoked=bool(row[5]))

    async def create_key(self, key: ApiKey) -> ApiKey:
        def _create() -> ApiKey:
            with self._tx() as conn:
                if self._get_account(conn, key.account_id) is None:
                    raise NotFound(f"no account {key.account_id}")
                conn.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?)",
                             (key.id, key.account_id, key.key_hash, key.prefix, key.created_ms, int(key.revoked)))
            return key

        return await self._run(_create)

    async def find_key(self, key_hash: str) -> ApiKey | None:
        def _find() -> ApiKey | None:
            row = self._conn().execute("SELECT id, account_id, key_hash, prefix, created, revoked FROM keys "
                                       "WHERE key_hash = ? AND revoked = 0", (key_hash,)).fetchone()
            return None if row is None else self._key(row)

        return await self._run(_find)

    async def list_keys(self, account_id: str) -> list[ApiKey]:
        def _list() -> list[ApiKey]:
            rows = self._conn().execute("SELECT id, account_id, key_hash, prefix, created, revoked FROM keys "
                                        "WHERE account_id = ? ORDER BY created, id", (account_id,)).fetchall()
            return [self._key(r) for r in rows]

        return await self._run(_list)

    async def revoke_key(self, key_id: str) -> bool:
        def _revoke() -> bool:
            with self._tx() as conn:
                return conn.execute("UPDATE keys SET revoked = 1 WHERE id = ? AND revoked = 0",
                                    (key_id,)).rowcount > 0

        return await self._run(_revoke)

    # -- bars -------------------------------------------------------------

    def _read_bars(self, conn: sqlite3.Connection, account: Account) -> tuple[BarSpec, BarState, BarSpec, BarState]:
        limits = account.limits()
        req_spec, wk_spec = limits.request_bar(self._unit), limits.weekly_bar()
        row = conn.execute("SELECT rl, ra, wl, wa FROM bars WHERE account_id = ?", (account.id,)).fetchone()
        if row is None:
            return req_spec, BarState.full(req_spec), wk_spec, BarState.full(wk_spec)
        req = BarState.full(req_spec) if row[0] is None else BarState(row[0], row[1])
        wk = BarState.full(wk_spec) if row[2] is None else BarState(row[2], row[3])
        return req_spec, req, wk_spec, wk

    @staticmethod
    def _write_bars(conn: sqlite3.Connection, account_id: str, req: BarState, wk: BarState) -> None:
        # NULL level = full: a full bar stays full whatever the capacity becomes.
        conn.execute("INSERT OR REPLACE INTO bars VALUES (?, ?, ?, ?, ?)", (
            account_id,
            None if req.anchor_ms is None else req.level, req.anchor_ms,
            None if wk.anchor_ms is None else wk.level, wk.anchor_ms))

    def _month_spend(self, conn: sqlite3.Connection, account_id: str, now_ms: int) -> int:
        row = conn.execute("SELECT pico FROM spend WHERE account_id = ? AND month = ?",
                           (account_id, month_id(now_ms))).fetchone()
        return 0 if row is None else int(row[0])

    def _snapshot_tx(self, conn: sqlite3.Connection, account: Account, now: int) -> Snapshot:
        if account.plan is PlanKind.PAYG:
            return Snapshot(account, now, month_spend_pico=self._month_spend(conn, account.id, now))
        req_spec, req, wk_spec, wk = self._read_bars(conn, account)
        return Snapshot(account, now, req_spec, settle(req_spec, req, now), wk_spec, settle(wk_spec, wk, now))

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
                assert snap.weekly is not None
                self._write_bars(conn, r.account_id, req_after, snap.weekly)
                snap = Snapshot(account, now, snap.request_spec, req_after, snap.weekly_spec, snap.weekly)
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
                    req_spec, req, wk_spec, wk = self._read_bars(conn, account)
                    wk = settle_weekly(wk_spec, wk, s.cost_pico, now)
                    req = refund_request(req_spec, req, s.refund_units, now) if s.refund_units \
                        else settle(req_spec, req, now)
                    self._write_bars(conn, account.id, req, wk)
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
