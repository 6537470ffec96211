"""Accounts and API keys on top of a store.

Secrets: a key is `ps-` + 43 random URL-safe characters (256 bits). Only its
SHA-256 is stored; with that much entropy no salt or slow hash is needed, and
lookup by hash needs no scan. The final comparison is `hmac.compare_digest`
so a match never depends on how many leading characters agree.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from cluster.key_limits import with_limits
from cluster.records import Account, ApiKey
from cluster.store import NotFound, Store
from policies.plans import DEFAULT_CATALOG, PlanCatalog, PlanError, PlanKind
from policies.units import PICO_PER_DOLLAR

KEY_PREFIX = "ps-"
DISPLAY_PREFIX_LEN = 10
AUTH_CACHE_S = 5.0


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_id(kind: str) -> str:
    return f"{kind}_{secrets.token_hex(8)}"


@dataclass(frozen=True)
class CreatedKey:
    key: ApiKey
    secret: str  # shown once, never stored


@dataclass(frozen=True)
class Principal:
    key: ApiKey
    account: Account


class AuthError(Exception):
    """Missing, unknown or revoked API key; or a suspended or deleted account."""


def validate_plan(plan: str, packs: Sequence[str] | None, spend_cap_usd: float | str | None,
                  concurrency: int | None,
                  catalog: PlanCatalog = DEFAULT_CATALOG) -> tuple[PlanKind, tuple[str, ...], int | None, int]:
    """Turn user input (admin API, CLI) into a plan, or raise PlanError naming the problem."""
    try:
        kind = PlanKind(plan)
    except ValueError:
        raise PlanError(f"plan must be 'subscription' or 'payg', got {plan!r}") from None
    if kind is PlanKind.SUBSCRIPTION:
        if spend_cap_usd is not None:
            raise PlanError("a spend cap applies to payg accounts only")
        return kind, catalog.parse_packs(packs if packs is not None else []), None, 4
    if packs:
        raise PlanError("payg accounts have no packs")
    cap: int | None = None
    if spend_cap_usd is not None:
        try:
            dollars = Decimal(str(spend_cap_usd))
        except InvalidOperation:
            raise PlanError(f"spend cap must be a dollar amount, got {spend_cap_usd!r}") from None
        if not dollars.is_finite() or dollars <= 0:
            raise PlanError("spend cap must be a positive dollar amount")
        cap = int(dollars * PICO_PER_DOLLAR)
    conc = 4 if concurrency is None else concurrency
    if isinstance(conc, bool) or not isinstance(conc, int) or not 1 <= conc <= 1000:
        raise PlanError("payg concurrency must be an integer from 1 to 1000")
    return kind, (), cap, conc


def _caps_fit(account: Account, key: ApiKey) -> ApiKey:
    """Key caps are shares of a subscription's bars; a payg account has none to share."""
    if account.plan is PlanKind.PAYG and (key.max_requests is not None or key.max_weekly_pico is not None):
        raise PlanError("max_requests and max_weekly_usd cap a key's share of a subscription's bars; "
                        "this account is payg (use its spend cap)")
    return key


class Accounts:
    def __init__(self, store: Store, clock_ms: Callable[[], int] | None = None) -> None:
        self._store = store
        self._clock = clock_ms or (lambda: time.time_ns() // 1_000_000)
        self._cache: dict[str, tuple[float, Principal]] = {}

    async def create(self, name: str, plan: str, packs: Sequence[str] | None = None,
                     spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Account:
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise PlanError("name must be a non-empty string of at most 200 characters")
        kind, pack_kinds, cap, conc = validate_plan(plan, packs, spend_cap_usd, concurrency, self._store.plans)
        account = Account(new_id("acct"), name.strip(), kind, pack_kinds, cap, conc, False, self._clock(),
                          self._store.plans)
        return await self._store.create_account(account)

    async def get(self, account_id: str) -> Account:
        account = await self._store.get_account(account_id)
        if account is None:
            raise NotFound(f"no account {account_id!r}")
        return account

    async def set_plan(self, account_id: str, plan: str, packs: Sequence[str] | None = None,
                       spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Account:
        kind, pack_kinds, cap, conc = validate_plan(plan, packs, spend_cap_usd, concurrency, self._store.plans)
        account = await self._store.set_plan(account_id, kind, pack_kinds, cap, conc)
        self._cache.clear()
        return account

    async def set_suspended(self, account_id: str, suspended: bool) -> Account:
        account = await self._store.set_suspended(account_id, suspended)
        self._cache.clear()
        return account

    async def delete(self, account_id: str) -> None:
        if not await self._store.delete_account(account_id):
            raise NotFound(f"no account {account_id!r}")
        self._cache.clear()

    async def create_key(self, account_id: str, limits: Mapping[str, Any] | None = None) -> CreatedKey:
        """`limits`: models, expires, max_requests, max_weekly_usd, disabled (cluster.key_limits)."""
        account = await self.get(account_id)
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        key = ApiKey(new_id("key"), account_id, hash_secret(secret), secret[:DISPLAY_PREFIX_LEN], self._clock())
        key = _caps_fit(account, with_limits(key, **dict(limits or {})))
        await self._store.create_key(key)
        return CreatedKey(key, secret)

    async def update_key(self, account_id: str, key_id: str, limits: Mapping[str, Any]) -> ApiKey:
        """Change a key's limits; `limits` may hold `clear`: names of limits to remove."""
        account = await self.get(account_id)
        found = [k for k in await self._store.list_keys(account_id) if k.id == key_id and not k.revoked]
        if not found:
            raise NotFound(f"no active key {key_id!r} on account {account_id!r}")
        key = _caps_fit(account, with_limits(found[0], **dict(limits)))
        if not await self._store.update_key(key):
            raise NotFound(f"no active key {key_id!r} on account {account_id!r}")
        self._cache.clear()
        return key

    async def revoke_key(self, key_id: str) -> None:
        if not await self._store.revoke_key(key_id):
            raise NotFound(f"no active key {key_id!r}")
        self._cache.clear()

    async def authenticate(self, secret: str | None, now_s: float | None = None) -> Principal:
        """Resolve a presented secret to its key and account, caching briefly."""
        if not secret:
            raise AuthError("missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'")
        digest = hash_secret(secret)
        now = time.monotonic() if now_s is None else now_s
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > now:
            return cached[1]
        key = await self._store.find_key(digest)
        if key is None or not hmac.compare_digest(key.key_hash, digest):
            raise AuthError("invalid API key")
        account = await self._store.get_account(key.account_id)
        if account is None:
            raise AuthError("invalid API key")
        principal = Principal(key, account)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now + AUTH_CACHE_S, principal)
        return principal

    def forget_cached(self) -> None:
        """Forget every cached key now rather than within AUTH_CACHE_S (a key or account changed in the store)."""
        self._cache.clear()
