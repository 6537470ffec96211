"""The Redis store: admission state shared by any number of gateways.

Every decision is one Lua script (cluster/lua/*.lua, each with bars.lua, the
Lua twin of the `policies` math, and store.lua prepended), so it is atomic and
costs one round trip. Time comes from Redis `TIME` inside the scripts, so
gateways with skewed clocks agree; tests inject it with `now_ms`.

Key schema. `{A}` is the account id in braces, a Redis Cluster hash tag: every
per-account key lives in the account's slot. Integers are stored as decimal
strings; times in ms, request bar in request units, money in picodollars.

  packserve:{A}:account        hash    id name plan packs cap pconc susp created
                                       r_req w_usd c_std c_small: the pack sums, so a
                                       script derives both bar specs without Python;
                                       rl ra wl wa: bar levels/anchors (no level = full);
                                       rc wc: the capacity each level was recorded against;
                                       qseq: FIFO sequence counter
  packserve:{A}:lease:<model>  zset    lease_id -> expiry ms
  packserve:{A}:queue:<model>  zset    waiter_id -> FIFO sequence
  packserve:{A}:qexp:<model>   zset    waiter_id -> expiry ms (a dead waiter stops blocking)
  packserve:{A}:models         set     models that had leases or waiters (found at deletion)
  packserve:{A}:keys           hash    key id -> JSON {id, account_id, hash, prefix, created, models,
                                       expires, disabled, max_req, max_wk} (limits: cluster/key_limits.py)
  packserve:{A}:keybars        hash    <key id>:rl|ra|rc|wl|wa|wc: the capped keys' own bars
  packserve:{A}:alerts         hash    <bar>:<threshold> -> f:<ms> fired | a:<ms> re-armed (cluster/alerts.py)
  packserve:alerts:due         zset    alert id -> next delivery try ms
  packserve:alerts:event       hash    alert id -> JSON payload
  packserve:alerts:tries       hash    alert id -> delivery attempts
  packserve:{A}:revoked        set     revoked key ids
  packserve:{A}:refusals       list    the account's recent refusals (cluster/observations_redis.py,
                                       with the gateways' heartbeats and the latency samples)
  packserve:{A}:settled        zset    lease_id -> settle ms, kept 1 day (idempotent settle)
  packserve:{A}:usage          stream  field e = msgpack UsageEvent; id ms >= the event's ts
  packserve:{A}:spend          hash    UTC month start ms -> payg spend
  packserve:accounts           zset    account id -> created ms
  packserve:keyhash            hash    sha256 hex -> JSON key record (active keys only)
  packserve:keyid              hash    key id -> account id (key ids are globally unique)
  packserve:checkpoints        zset    lease_id -> due ms: settle it then unless renewed
  packserve:checkpoint         hash    lease_id -> msgpack Settlement (what a dead gateway owed)
  channel packserve:wake:{A}:<model>   published whenever a slot may have freed
  packserve:cap:{M}:*          model capacity, one slot per model {M} (see lua/capacity.lua):
                                       run owner wait wexp act vtc meta paid
  channel packserve:wake:cap:{M}:<entry>  published when a waiting request is dispatched

Redis Cluster: the hot path (reserve, settle, renew, snapshot) touches one
slot; a checkpoint (written as each response starts and at each lease
renewal, dropped when it settles) touches the two global checkpoint keys.
Account and key administration also updates the three global indexes in the
same script; on a cluster those scripts would need splitting.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from functools import cache
from pathlib import Path
from typing import Any, Final, cast
from urllib.parse import SplitResult, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from cluster.observations_redis import RedisObservations
from cluster.records import Account, ApiKey, UsageEvent
from cluster.store import (
    AccountLoad,
    Admitted,
    CapacityGone,
    CapacityGranted,
    CapacityOutcome,
    CapacityStats,
    CapacityTerms,
    CapacityWaiting,
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
from policies.admission import Reason
from policies.auth_failures import MAX_SOURCE_LEN, AuthVerdict
from policies.bars import BarState
from policies.plans import DEFAULT_CATALOG, PlanCatalog, PlanKind
from policies.units import DAY_MS, PICO_PER_DOLLAR

log = logging.getLogger("packserve.redis")

Clock = Callable[[], int | None]

# Connections one store (one gateway process) opens to Redis at most. Redis runs one command at a
# time, so more add no throughput; a command past them waits for one to come free.
MAX_CONNECTIONS: Final = 128

LUA_DIR: Final = Path(__file__).parent / "lua"
STORE_LIBRARIES: Final = ("bars", "store")
SCRIPTS: Final = (
    "reserve",
    "settle",
    "snapshot",
    "renew",
    "active_leases",
    "leave_queue",
    "create_account",
    "set_plan",
    "set_suspended",
    "delete_account",
    "create_key",
    "revoke_key",
    "checkpoint",
    "sync_plan",
    "update_key",
    "alert_claim",
    "alert_take",
    "auth_failures",
    "gateway_beat",
    "gateways",
)
CAPACITY_LIBRARIES: Final = ("bars", "store", "fairness", "capacity")
CAPACITY_SCRIPTS: Final = ("cap_acquire", "cap_renew", "cap_release", "cap_stats", "cap_forget")
CAPACITY_KEYS: Final = ("run", "owner", "wait", "wexp", "act", "vtc", "meta", "paid", "pre")
SETTLED_MEMORY_MS: Final = DAY_MS
USAGE_PAGE: Final = 1000
PURGE_BATCH: Final = 500
# A queued caller's reserve waits this long for the wake-up listener to be
# subscribed; past it, the caller still re-checks at the earliest lease expiry.
LISTENER_READY_TIMEOUT_S: Final = 2.0
LISTENER_MAX_BACKOFF_S: Final = 2.0


# -- URLs -------------------------------------------------------------------


def _redacted(parts: SplitResult) -> str:
    if parts.password is None:
        return parts.geturl()
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def describe_redis_url(url: str) -> str:
    """Validate a Redis URL; return where it points ("host:port" or a socket path).

    Raises ValueError naming what is wrong, with any password masked.
    """
    if not isinstance(url, str) or not url.strip():
        raise ValueError("the Redis URL is empty (expected e.g. redis://localhost:6379/0)")
    parts = urlsplit(url.strip())
    shown = _redacted(parts)
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError(f"Redis URL {shown!r} has no socket path (expected unix:///path/to/redis.sock)")
        return parts.path
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"Redis URL {shown!r} must start with redis://, rediss:// or unix://")
    if not parts.hostname:
        raise ValueError(f"Redis URL {shown!r} has no host (expected redis://host:port/db)")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError(f"Redis URL {shown!r} has an invalid port (expected a number 1-65535)") from None
    db = parts.path.lstrip("/")
    if db and not db.isdigit():
        raise ValueError(f"Redis URL {shown!r} has an invalid database {db!r} (expected a number such as /0)")
    return f"{parts.hostname}:{port}"


# -- scripts ----------------------------------------------------------------


@cache
def lua_source(name: str, libraries: Sequence[str] = STORE_LIBRARIES) -> str:
    """A script's full text: the shared libraries, then the script itself."""
    parts = [(LUA_DIR / f"{lib}.lua").read_text(encoding="utf-8") for lib in (*libraries, name)]
    return "\n".join(parts)


def bar_config(request_unit: int, plans: PlanCatalog = DEFAULT_CATALOG) -> list[int]:
    """ARGV[1..6] of every bar script (see store.lua): the schedules come from the operator's plans."""
    r, w = plans.request_schedule, plans.weekly_schedule
    return [request_unit, r.tick_percent, r.tick_ms, w.tick_percent, w.tick_ms, PICO_PER_DOLLAR]


class _Keys:
    """Key names of one account (see the schema above)."""

    def __init__(self, prefix: str, account_id: str) -> None:
        self.base = f"{prefix}{{{account_id}}}:"
        self.wake_base = f"{prefix}wake:{{{account_id}}}:"
        self.account = self.base + "account"
        self.models = self.base + "models"
        self.keys = self.base + "keys"
        self.revoked = self.base + "revoked"
        self.settled = self.base + "settled"
        self.usage = self.base + "usage"
        self.spend = self.base + "spend"
        self.keybars = self.base + "keybars"
        self.alerts = self.base + "alerts"

    def lease(self, model: str) -> str:
        return f"{self.base}lease:{model}"

    def queue(self, model: str) -> str:
        return f"{self.base}queue:{model}"

    def queue_expiry(self, model: str) -> str:
        return f"{self.base}qexp:{model}"

    def wake(self, model: str) -> str:
        return self.wake_base + model


# -- decoding ---------------------------------------------------------------


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _int(value: bytes | str) -> int:
    text = _text(value)
    # Sorted-set scores come back as doubles' text; ours are whole numbers.
    return int(text) if text.lstrip("-").isdigit() else int(float(text))


def _opt_int(value: bytes | str) -> int | None:
    return None if _text(value) == "" else _int(value)


def _fields(flat: Sequence[bytes | str]) -> dict[str, str]:
    """A script's HGETALL list as text."""
    return {_text(flat[i]): _text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _hash_fields(mapping: Mapping[bytes | str, bytes | str]) -> dict[str, str]:
    """redis-py's HGETALL dict as text."""
    return {_text(k): _text(v) for k, v in mapping.items()}


def _texts(values: Iterable[Any]) -> list[str]:
    """Plain member lists (ZRANGE without scores, SMEMBERS) as text."""
    return [_text(v) for v in values]


def _account_from_hash(fields: dict[str, str], plans: PlanCatalog = DEFAULT_CATALOG) -> Account:
    return Account(
        id=fields["id"],
        name=fields["name"],
        plan=PlanKind(fields["plan"]),
        packs=tuple(p for p in fields["packs"].split(",") if p),
        spend_cap_pico=None if fields.get("cap", "") == "" else int(fields["cap"]),
        payg_concurrency=int(fields["pconc"]),
        suspended=fields["susp"] == "1",
        created_ms=int(fields["created"]),
        catalog=plans,
    )


def _pack_sums(plan: PlanKind, packs: Sequence[str], plans: PlanCatalog) -> dict[str, str]:
    """The pack sums the scripts derive both bars and the slot limits from."""
    r_req = w_usd = c_std = c_small = 0
    if plan is PlanKind.SUBSCRIPTION:
        limits = plans.limits(packs)  # refuses 0 or 6 packs, unknown kinds
        r_req, w_usd = limits.requests, limits.weekly_dollars
        c_std, c_small = limits.concurrency_standard, limits.concurrency_small
    return {"r_req": str(r_req), "w_usd": str(w_usd), "c_std": str(c_std), "c_small": str(c_small)}


def _plan_fields(
    plan: PlanKind, packs: Sequence[str], spend_cap_pico: int | None, payg_concurrency: int,
    plans: PlanCatalog = DEFAULT_CATALOG,
) -> dict[str, str]:
    """The plan part of the account hash, with the pack sums the scripts need."""
    return {
        "plan": plan.value,
        "packs": ",".join(packs),
        "cap": "" if spend_cap_pico is None else str(spend_cap_pico),
        "pconc": str(payg_concurrency),
        **_pack_sums(plan, packs, plans),
    }


def _flatten(fields: dict[str, str]) -> list[str]:
    return [item for pair in fields.items() for item in pair]


def _key_record(key: ApiKey) -> str:
    return json.dumps(
        {
            "id": key.id,
            "account_id": key.account_id,
            "hash": key.key_hash,
            "prefix": key.prefix,
            "created": key.created_ms,
            "models": list(key.models),
            "expires": key.expires_ms,
            "disabled": key.disabled,
            "max_req": key.max_requests,
            "max_wk": key.max_weekly_pico,
        },
        separators=(",", ":"),
    )


def _key_from_record(record: bytes | str, revoked: bool) -> ApiKey:
    r = json.loads(record)
    return ApiKey(
        id=r["id"],
        account_id=r["account_id"],
        key_hash=r["hash"],
        prefix=r["prefix"],
        created_ms=int(r["created"]),
        revoked=revoked,
        models=tuple(r.get("models") or ()),
        expires_ms=r.get("expires"),
        disabled=bool(r.get("disabled", False)),
        max_requests=r.get("max_req"),
        max_weekly_pico=r.get("max_wk"),
    )


# -- wake-ups ---------------------------------------------------------------


class _WakeListener:
    """One pattern subscription per store, turning PUBLISHes into local events.

    Started lazily inside the running loop by the first waiter. Once it is
    subscribed again after a lost connection, every waiter is woken once: a
    wake-up published during the gap is lost, and a spurious one only costs a
    re-check (waking earlier would only send waiters to a Redis that is down).
    """

    def __init__(self, url: str, pattern: str) -> None:
        self._url = url
        self._pattern = pattern
        self._events: dict[bytes, set[asyncio.Event]] = {}
        self._task: asyncio.Task[None] | None = None
        self._ready = asyncio.Event()
        self._closed = False

    @property
    def started(self) -> bool:
        return self._task is not None and not self._task.done()

    def register(self, channel: bytes) -> asyncio.Event:
        # After close() a waiter still works: it just times out instead of being woken.
        if not self.started and not self._closed:
            self._ready = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="packserve-redis-wake")
        event = asyncio.Event()
        self._events.setdefault(channel, set()).add(event)
        return event

    def unregister(self, channel: bytes, event: asyncio.Event) -> None:
        events = self._events.get(channel)
        if events is not None:
            events.discard(event)
            if not events:
                del self._events[channel]

    async def wait_ready(self, timeout_s: float) -> None:
        if self.started and not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout_s)

    def _wake(self, channel: bytes) -> None:
        for event in self._events.get(channel, ()):
            event.set()

    def _wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()

    async def _run(self) -> None:
        # Its own client: a blocking subscription must not hit the command socket timeout.
        client = Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=5.0)
        backoff = 0.05
        subscribed_before = False
        try:
            while True:
                pubsub = client.pubsub()
                try:
                    await pubsub.psubscribe(self._pattern)
                    while True:
                        message = await pubsub.get_message(timeout=None)
                        if message is None:
                            continue
                        if message["type"] == "psubscribe":
                            self._ready.set()
                            backoff = 0.05
                            if subscribed_before:
                                self._wake_all()
                            subscribed_before = True
                        elif message["type"] == "pmessage":
                            self._wake(message["channel"])
                except (RedisError, OSError) as exc:
                    self._ready.clear()
                    log.warning("Redis wake-up listener lost its connection: %s", exc)
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, LISTENER_MAX_BACKOFF_S)
                finally:
                    with contextlib.suppress(RedisError, OSError):
                        await pubsub.aclose()
        finally:
            with contextlib.suppress(RedisError, OSError):
                await client.aclose()

    async def close(self) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._wake_all()


class _SlotWaiter:
    def __init__(self, listener: _WakeListener, channel: str) -> None:
        self._listener = listener
        self._channel = channel.encode()
        self._event = listener.register(self._channel)

    async def wait(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, timeout_s))
        except TimeoutError:
            return False
        self._event.clear()
        return True

    def close(self) -> None:
        self._listener.unregister(self._channel, self._event)


# -- the store --------------------------------------------------------------


class RedisStore:
    """The `Store` protocol on Redis. Create with `await RedisStore.connect(url, request_unit=...)`.

    `request_unit` is units per weight-1.0 request (`WeightPolicy.unit`); the
    scripts multiply the stored pack sums by it, so a changed reference price
    applies to every account at once.
    """

    def __init__(
        self,
        url: str,
        *,
        request_unit: int,
        key_prefix: str = "packserve:",
        socket_timeout_s: float = 5.0,
        max_connections: int = MAX_CONNECTIONS,
        clock: Clock | None = None,
        plans: PlanCatalog = DEFAULT_CATALOG,
    ) -> None:
        self._where = describe_redis_url(url)
        # Tests inject a fake clock, like EmbeddedStore's; None (the default) means Redis TIME.
        self._clock = clock
        self._url = url.strip()
        self._unit = request_unit
        self._prefix = key_prefix
        self._plans = plans
        self._config = bar_config(request_unit, plans)
        try:
            # Retrying is safe: reserve is idempotent per lease id, settle per lease id.
            # A blocking pool: a command waits (up to the socket timeout) for a free connection. redis-py's
            # default pool refuses the 101st concurrent command ("Too many connections"), which under 1,000
            # streams turned a busy gateway into 503 store_unavailable with Redis itself idle.
            self._client = Redis.from_pool(BlockingConnectionPool.from_url(
                self._url,
                max_connections=max_connections,
                timeout=socket_timeout_s,
                socket_timeout=socket_timeout_s,
                socket_connect_timeout=socket_timeout_s,
                retry=Retry(ExponentialBackoff(cap=0.25, base=0.025), 2),
            ))
        except (ValueError, TypeError) as exc:
            raise ValueError(f"Redis URL for {self._where} is malformed: {exc}") from None
        self._scripts: dict[str, AsyncScript] = {
            name: self._client.register_script(lua_source(name)) for name in SCRIPTS
        }
        for name in CAPACITY_SCRIPTS:
            self._scripts[name] = self._client.register_script(lua_source(name, CAPACITY_LIBRARIES))
        self._listener = _WakeListener(self._url, f"{key_prefix}wake:*")
        self._observations = RedisObservations(self._client, key_prefix, self._errors, self._run, clock)
        self._closed = False

    @classmethod
    async def connect(
        cls, url: str, *, request_unit: int, key_prefix: str = "packserve:", clock: Clock | None = None,
        plans: PlanCatalog = DEFAULT_CATALOG,
    ) -> RedisStore:
        """Validate the URL, check Redis answers and load the scripts.

        Raises ValueError for a malformed URL and StoreError when Redis cannot be reached.
        """
        store = cls(url, request_unit=request_unit, key_prefix=key_prefix, clock=clock, plans=plans)
        try:
            await store.load_scripts()
        except StoreError:
            await store.close()
            raise
        return store

    @property
    def plans(self) -> PlanCatalog:
        return self._plans

    @property
    def observations(self) -> RedisObservations:
        """Live gateways, refusals and latency samples (cluster/observations_redis.py)."""
        return self._observations

    async def sync_plans(self, apply: bool = True) -> int:
        """Refresh every subscription's stored pack sums from the plans; returns how many differ.

        An edited pack kind (more requests, a new weekly credit) then applies
        to every account holding it; the bars follow on their next use. With
        `apply=False` (the local CLI) nothing is written: only unknown kinds raise.
        """
        changed = 0
        with self._errors():
            ids = _texts(await self._client.zrange(self._accounts_index, 0, -1))
            pipe = self._client.pipeline(transaction=False)
            for account_id in ids:
                pipe.hmget(self._keys(account_id).account, ["plan", "packs", "r_req", "w_usd", "c_std", "c_small"])
            rows = await pipe.execute()
        for account_id, row in zip(ids, rows, strict=True):
            plan, packs, *stored = [None if v is None else _text(v) for v in row]
            if plan != PlanKind.SUBSCRIPTION.value or packs is None:
                continue
            sums = _pack_sums(PlanKind.SUBSCRIPTION, [p for p in packs.split(",") if p], self._plans)
            if list(sums.values()) != stored:
                changed += 1 if not apply else int(await self._run(
                    "sync_plan", [self._keys(account_id).account], [packs, *_flatten(sums)]))
        return changed

    async def load_scripts(self) -> None:
        with self._errors():
            await self._client.ping()
            for script in self._scripts.values():
                await self._client.script_load(script.script)

    # -- plumbing ---------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StoreError(f"cannot reach Redis at {self._where}: {exc}") from exc
        except RedisError as exc:
            raise StoreError(f"Redis at {self._where} answered an error: {exc}") from exc

    async def _run(self, script: str, keys: Sequence[str], args: Sequence[str | int | bytes]) -> Any:
        with self._errors():
            return await self._scripts[script](keys=list(keys), args=list(args))

    def _keys(self, account_id: str) -> _Keys:
        return _Keys(self._prefix, account_id)

    @property
    def _accounts_index(self) -> str:
        return f"{self._prefix}accounts"

    @property
    def _keyhash_index(self) -> str:
        return f"{self._prefix}keyhash"

    @property
    def _keyid_index(self) -> str:
        return f"{self._prefix}keyid"

    def _now_arg(self, now_ms: int | None) -> str | int:
        """The scripts' "now" argument: '' lets the script read Redis TIME."""
        if now_ms is None and self._clock is not None:
            now_ms = self._clock()
        return "" if now_ms is None else now_ms

    def _parse_snapshot(self, reply: Sequence[bytes]) -> Snapshot:
        """Decode the reply() layout of store.lua."""
        account = _account_from_hash(_fields(reply[9:]), self._plans)
        now = _int(reply[1])
        if account.plan is PlanKind.PAYG:
            return Snapshot(account, now, month_spend_pico=_int(reply[8]))
        limits = account.limits()
        return Snapshot(
            account,
            now,
            request_spec=limits.request_bar(self._unit),
            request=BarState(_int(reply[4]), _opt_int(reply[5])),
            weekly_spec=limits.weekly_bar(),
            weekly=BarState(_int(reply[6]), _opt_int(reply[7])),
        )

    async def now_ms(self) -> int:
        injected = self._clock() if self._clock is not None else None
        if injected is not None:
            return injected
        with self._errors():
            seconds, micros = await self._client.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._listener.close()
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    # -- accounts ---------------------------------------------------------

    async def create_account(self, account: Account) -> Account:
        fields = {
            "id": account.id,
            "name": account.name,
            "susp": "1" if account.suspended else "0",
            "created": str(account.created_ms),
        }
        fields |= _plan_fields(account.plan, account.packs, account.spend_cap_pico, account.payg_concurrency,
                               self._plans)
        keys = self._keys(account.id)
        created = await self._run(
            "create_account", [keys.account, self._accounts_index], [account.id, account.created_ms, *_flatten(fields)]
        )
        if not created:
            raise ValueError(f"account {account.id} already exists")
        return replace(account, catalog=self._plans)

    async def get_account(self, account_id: str) -> Account | None:
        with self._errors():
            fields = await self._client.hgetall(self._keys(account_id).account)
        return _account_from_hash(_hash_fields(fields), self._plans) if fields else None

    async def list_accounts(self) -> list[Account]:
        with self._errors():
            ids = _texts(await self._client.zrange(self._accounts_index, 0, -1))
            pipe = self._client.pipeline(transaction=False)
            for account_id in ids:
                pipe.hgetall(self._keys(account_id).account)
            rows = await pipe.execute()
        # An account deleted between the two reads is simply not listed.
        return [_account_from_hash(_hash_fields(row), self._plans) for row in rows if row]

    async def set_plan(
        self,
        account_id: str,
        plan: PlanKind,
        packs: Sequence[str],
        spend_cap_pico: int | None,
        payg_concurrency: int,
        now_ms: int | None = None,
    ) -> Account:
        fields = _plan_fields(plan, packs, spend_cap_pico, payg_concurrency, self._plans)
        flat = await self._run(
            "set_plan", [self._keys(account_id).account], [*self._config, self._now_arg(now_ms), *_flatten(fields)]
        )
        if not flat:
            raise NotFound(f"no account {account_id}")
        return _account_from_hash(_fields(flat), self._plans)

    async def set_suspended(self, account_id: str, suspended: bool) -> Account:
        flat = await self._run("set_suspended", [self._keys(account_id).account], ["1" if suspended else "0"])
        if not flat:
            raise NotFound(f"no account {account_id}")
        return _account_from_hash(_fields(flat), self._plans)

    async def delete_account(self, account_id: str) -> bool:
        k = self._keys(account_id)
        existed = await self._run(
            "delete_account",
            [
                k.account,
                k.keys,
                k.revoked,
                k.models,
                k.settled,
                k.usage,
                k.spend,
                self._accounts_index,
                self._keyhash_index,
                self._keyid_index,
            ],
            [account_id, k.base, k.wake_base],
        )
        await self._forget_counters(account_id)
        return bool(existed)

    async def _forget_counters(self, account_id: str) -> None:
        """Drop the account's scheduler counters on every model it used (one hash slot per model)."""
        head, tail = f"{self._prefix}cap:{{", "}:vtc"
        with self._errors():
            async for raw in self._client.scan_iter(match=f"{self._prefix}cap:*:vtc", count=500):
                key = _text(raw)
                if key.startswith(head) and key.endswith(tail):
                    await self._run("cap_forget", self._capacity_keys(key[len(head):-len(tail)]), [account_id])

    # -- keys -------------------------------------------------------------

    async def create_key(self, key: ApiKey) -> ApiKey:
        k = self._keys(key.account_id)
        outcome = _text(
            await self._run(
                "create_key",
                [k.account, k.keys, k.revoked, self._keyhash_index, self._keyid_index],
                [key.id, key.key_hash, _key_record(key), key.account_id, "1" if key.revoked else "0"],
            )
        )
        if outcome == "missing":
            raise NotFound(f"no account {key.account_id}")
        if outcome == "duplicate_id":
            raise ValueError(f"key id {key.id} already exists")
        if outcome == "duplicate_hash":
            raise ValueError("an API key with this secret already exists")
        return key

    async def find_key(self, key_hash: str) -> ApiKey | None:
        with self._errors():
            record = await self._client.hget(self._keyhash_index, key_hash)
        if record is None:
            return None
        key = _key_from_record(record, revoked=False)
        # The index lookup found it; compare in constant time anyway (SPEC §3).
        return key if hmac.compare_digest(key.key_hash, key_hash) else None

    async def list_keys(self, account_id: str) -> list[ApiKey]:
        k = self._keys(account_id)
        with self._errors():
            pipe = self._client.pipeline(transaction=False)
            pipe.hgetall(k.keys)
            pipe.smembers(k.revoked)
            records, revoked = await pipe.execute()
        revoked_ids = {_text(r) for r in revoked}
        keys = [_key_from_record(rec, _text(kid) in revoked_ids) for kid, rec in records.items()]
        return sorted(keys, key=lambda key: (key.created_ms, key.id))

    async def revoke_key(self, key_id: str) -> bool:
        with self._errors():
            account_id = await self._client.hget(self._keyid_index, key_id)
        if account_id is None:
            return False
        k = self._keys(_text(account_id))
        return bool(await self._run("revoke_key", [k.keys, k.revoked, self._keyhash_index], [key_id]))

    # -- usage alerts -------------------------------------------------------

    @property
    def _alert_keys(self) -> list[str]:
        return [f"{self._prefix}alerts:due", f"{self._prefix}alerts:event", f"{self._prefix}alerts:tries"]

    async def claim_alert(self, account_id: str, name: str, above: bool, now_ms: int, alert_id: str,
                          payload: str) -> bool:
        due, events, _ = self._alert_keys
        return bool(await self._run("alert_claim", [self._keys(account_id).alerts, due, events],
                                    [name, "1" if above else "0", now_ms, alert_id, payload]))

    async def take_alerts(self, now_ms: int, limit: int, backoff_base_ms: int,
                          backoff_cap_ms: int) -> list[tuple[str, str, int]]:
        flat = await self._run("alert_take", self._alert_keys, [now_ms, limit, backoff_base_ms, backoff_cap_ms])
        return [(_text(flat[i]), _text(flat[i + 1]), int(flat[i + 2])) for i in range(0, len(flat), 3)]

    async def alert_done(self, alert_id: str) -> None:
        due, events, tries = self._alert_keys
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(due, alert_id)
                pipe.hdel(events, alert_id)
                pipe.hdel(tries, alert_id)
                await pipe.execute()

    async def update_key(self, key: ApiKey) -> bool:
        k = self._keys(key.account_id)
        return bool(await self._run("update_key", [k.keys, k.revoked, self._keyhash_index],
                                    [key.id, _key_record(key)]))

    # -- admission --------------------------------------------------------

    async def reserve(self, request: ReserveRequest, now_ms: int | None = None) -> ReserveOutcome:
        if request.waiter_id is not None:
            # A wake-up published before the subscription is live would be lost.
            await self._listener.wait_ready(LISTENER_READY_TIMEOUT_S)
        k = self._keys(request.account_id)
        m = request.model
        reply = await self._run(
            "reserve",
            [k.account, k.lease(m), k.queue(m), k.queue_expiry(m), k.models, k.spend, k.keybars, k.keys],
            [
                *self._config,
                self._now_arg(now_ms),
                m,
                request.size_class.value,
                request.weight_units,
                request.lease_id,
                request.lease_ttl_ms,
                request.waiter_id or "",
                request.waiter_ttl_ms,
                request.key_id,
            ],
        )
        status = _text(reply[0])
        if status == "missing":
            raise NotFound(f"no account {request.account_id}")
        snapshot = self._parse_snapshot(reply)
        if status == "admitted":
            lease = Lease(
                request.lease_id, request.account_id, m, request.weight_units, snapshot.now_ms, _int(reply[2])
            )
            return Admitted(lease, snapshot)
        if status == "refused":
            return Refused(Reason(_text(reply[2])), _opt_int(reply[3]), snapshot)
        return SlotBusy(_opt_int(reply[2]), _int(reply[3]))

    async def leave_queue(self, account_id: str, model: str, waiter_id: str) -> None:
        k = self._keys(account_id)
        await self._run("leave_queue", [k.queue(model), k.queue_expiry(model)], [waiter_id, k.wake(model)])

    async def renew(self, lease: Lease, ttl_ms: int, now_ms: int | None = None) -> bool:
        k = self._keys(lease.account_id)
        renewed = await self._run("renew", [k.lease(lease.model)], [self._now_arg(now_ms), lease.lease_id, ttl_ms])
        return bool(renewed)

    async def record_auth_failure(self, source: str, limit: int, window_ms: int,
                                  now_ms: int | None = None) -> AuthVerdict:
        key = f"{self._prefix}authfail:{source[:MAX_SOURCE_LEN]}"
        count, refused, retry = await self._run("auth_failures", [key], [self._now_arg(now_ms), limit, window_ms])
        return AuthVerdict(int(count), bool(refused), int(retry))

    async def settle(self, settlement: Settlement, now_ms: int | None = None) -> Snapshot | None:
        if settlement.cost_pico < 0:
            raise ValueError("a token cost cannot be negative")
        lease, event = settlement.lease, settlement.event
        k = self._keys(lease.account_id)
        reply = await self._run(
            "settle",
            [k.account, k.lease(lease.model), k.settled, k.usage, k.spend, k.keybars, k.keys],
            [
                *self._config,
                self._now_arg(now_ms),
                lease.lease_id,
                settlement.cost_pico,
                settlement.refund_units,
                event.encode(),
                event.ts_ms,
                settlement.retention_ms,
                k.wake(lease.model),
                SETTLED_MEMORY_MS,
                event.key_id,
            ],
        )
        if _text(reply[0]) == "missing":
            return None
        return self._parse_snapshot(reply)

    @property
    def _checkpoint_keys(self) -> list[str]:
        return [f"{self._prefix}checkpoints", f"{self._prefix}checkpoint"]

    async def checkpoint(self, settlement: Settlement, ttl_ms: int, now_ms: int | None = None) -> None:
        await self._run("checkpoint", self._checkpoint_keys,
                        [self._now_arg(now_ms), settlement.lease.lease_id, ttl_ms, settlement.encode()])

    async def due_checkpoints(self, now_ms: int | None = None, limit: int = 100) -> list[Settlement]:
        now = await self.now_ms() if now_ms is None else now_ms
        due_key, blobs_key = self._checkpoint_keys
        with self._errors():
            lease_ids = cast(list[bytes], await self._client.zrangebyscore(due_key, "-inf", now, start=0, num=limit))
            blobs = cast(list[bytes | None], await self._client.hmget(blobs_key, lease_ids)) if lease_ids else []
        return [Settlement.decode(blob) for blob in blobs if blob is not None]

    async def drop_checkpoint(self, lease_id: str) -> None:
        due_key, blobs_key = self._checkpoint_keys
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(due_key, lease_id)
                pipe.hdel(blobs_key, lease_id)
                await pipe.execute()

    async def snapshot(self, account_id: str, now_ms: int | None = None) -> Snapshot:
        k = self._keys(account_id)
        reply = await self._run("snapshot", [k.account, k.spend], [*self._config, self._now_arg(now_ms)])
        if _text(reply[0]) == "missing":
            raise NotFound(f"no account {account_id}")
        return self._parse_snapshot(reply)

    async def active_leases(self, account_id: str, model: str, now_ms: int | None = None) -> int:
        count = await self._run("active_leases", [self._keys(account_id).lease(model)], [self._now_arg(now_ms)])
        return int(count)

    def slot_waiter(self, account_id: str, model: str) -> _SlotWaiter:
        """Register before reserving, so a wake-up between the two is not lost."""
        return _SlotWaiter(self._listener, self._keys(account_id).wake(model))

    # -- model capacity ---------------------------------------------------

    def _capacity_keys(self, model: str) -> list[str]:
        return [f"{self._prefix}cap:{{{model}}}:{name}" for name in CAPACITY_KEYS]

    def _capacity_wake(self, model: str) -> str:
        return f"{self._prefix}wake:cap:{{{model}}}:"

    def _capacity_args(self, terms: CapacityTerms, now_ms: int | None) -> list[str | int]:
        return [self._now_arg(now_ms), terms.capacity, terms.mode.value, terms.lease_ttl_ms,
                self._capacity_wake(terms.model), 1 if terms.preempts else 0]

    async def capacity_acquire(self, terms: CapacityTerms, account_id: str, entry_id: str, wait_ttl_ms: int,
                               now_ms: int | None = None, *, join: bool = True) -> CapacityOutcome:
        # A dispatch published before the subscription is live would be lost.
        await self._listener.wait_ready(LISTENER_READY_TIMEOUT_S)
        reply = await self._run("cap_acquire", self._capacity_keys(terms.model),
                                [*self._capacity_args(terms, now_ms), account_id, entry_id, wait_ttl_ms,
                                 1 if join else 0])
        if _text(reply[0]) == "granted":
            return CapacityGranted(_int(reply[1]), _text(reply[2]) or None)
        if _text(reply[0]) == "gone":
            return CapacityGone()
        return CapacityWaiting(_int(reply[1]), _opt_int(reply[2]))

    async def capacity_renew(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                             now_ms: int | None = None) -> bool:
        renewed = await self._run("cap_renew", self._capacity_keys(terms.model),
                                  [*self._capacity_args(terms, now_ms), entry_id, counter_total])
        return bool(renewed)

    async def capacity_release(self, terms: CapacityTerms, entry_id: str, counter_total: int,
                               now_ms: int | None = None) -> bool:
        removed = await self._run("cap_release", self._capacity_keys(terms.model),
                                  [*self._capacity_args(terms, now_ms), entry_id, counter_total])
        return bool(removed)

    async def capacity_stats(self, terms: CapacityTerms, now_ms: int | None = None) -> CapacityStats:
        reply = await self._run("cap_stats", self._capacity_keys(terms.model), self._capacity_args(terms, now_ms))
        loads = [AccountLoad(_text(reply[i]), _int(reply[i + 1]), _int(reply[i + 2]), _int(reply[i + 3]))
                 for i in range(3, len(reply), 4)]
        loads.sort(key=lambda load: (load.counter, load.account_id))
        return CapacityStats(terms.model, _int(reply[0]), _int(reply[1]), _int(reply[2]), tuple(loads))

    def capacity_waiter(self, model: str, entry_id: str) -> _SlotWaiter:
        return _SlotWaiter(self._listener, self._capacity_wake(model) + entry_id)

    # -- usage ------------------------------------------------------------

    async def usage(self, account_id: str, since_ms: int = 0, until_ms: int | None = None) -> list[UsageEvent]:
        key = self._keys(account_id).usage
        start = str(max(0, since_ms))  # ids are never below the event time
        events: list[UsageEvent] = []
        with self._errors():
            while True:
                rows: list[Any] = await self._client.xrange(key, min=start, max="+", count=USAGE_PAGE) or []
                for _, fields in rows:
                    event = UsageEvent.decode(bytes(fields[b"e"]))
                    if event.ts_ms >= since_ms and (until_ms is None or event.ts_ms < until_ms):
                        events.append(event)
                if len(rows) < USAGE_PAGE:
                    break
                start = "(" + _text(rows[-1][0])
        # Stream order already follows settlement; sort by event time (stable within it).
        events.sort(key=lambda e: e.ts_ms)
        return events

    async def purge_usage(self, before_ms: int) -> int:
        removed = 0
        with self._errors():
            ids = _texts(await self._client.zrange(self._accounts_index, 0, -1))
            for start in range(0, len(ids), PURGE_BATCH):
                pipe = self._client.pipeline(transaction=False)
                for account_id in ids[start : start + PURGE_BATCH]:
                    pipe.xtrim(self._keys(account_id).usage, minid=max(0, before_ms), approximate=False)
                removed += sum(int(n) for n in await pipe.execute())
        return removed
