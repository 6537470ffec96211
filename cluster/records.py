"""Records kept in the store: accounts, API keys, usage events.

Usage events hold metadata only (SPEC §3): never prompt or completion text.
They are encoded with msgpack as a positional array so the schema is
explicit and compact in a Redis stream or a SQLite blob.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgpack

from policies.plans import DEFAULT_CATALOG, PlanCatalog, PlanError, PlanKind, SizeClass, SubscriptionLimits
from policies.units import PICO_PER_DOLLAR


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    plan: PlanKind
    packs: tuple[str, ...] = ()  # pack kind ids of the catalog
    spend_cap_pico: int | None = None  # payg only: monthly cap
    payg_concurrency: int = 4  # payg only: per model
    suspended: bool = False
    created_ms: int = 0
    # The operator's plans the store read this account under (not stored with it).
    catalog: PlanCatalog = field(default=DEFAULT_CATALOG, compare=False, repr=False)

    def limits(self) -> SubscriptionLimits:
        if self.plan is not PlanKind.SUBSCRIPTION:
            raise PlanError("payg accounts have no packs")
        return self.catalog.limits(self.packs)

    def concurrency(self, size: SizeClass) -> int:
        if self.plan is PlanKind.PAYG:
            return self.payg_concurrency
        return self.limits().concurrency(size)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "plan": self.plan.value,
            "packs": list(self.packs),
            "suspended": self.suspended,
            "created_ms": self.created_ms,
        }
        if self.plan is PlanKind.SUBSCRIPTION:
            lim = self.limits()
            out["limits"] = {
                "requests_per_5h": lim.requests,
                "weekly_dollars": lim.weekly_dollars,
                "concurrency_standard": lim.concurrency_standard,
                "concurrency_small": lim.concurrency_small,
                "monthly_price_usd": lim.monthly_price_cents / 100,
            }
        else:
            out["spend_cap_usd"] = None if self.spend_cap_pico is None else self.spend_cap_pico / PICO_PER_DOLLAR
            out["concurrency"] = self.payg_concurrency
        return out


@dataclass(frozen=True)
class ApiKey:
    id: str
    account_id: str
    key_hash: str  # hex sha256 of the secret; the secret itself is never stored
    prefix: str  # first characters of the secret, for display
    created_ms: int
    revoked: bool = False
    # Per-key limits (cluster.key_limits): empty `models` allows every model;
    # the caps are this key's own share of the account's bars, None = no cap.
    models: tuple[str, ...] = ()
    expires_ms: int | None = None
    disabled: bool = False
    max_requests: int | None = None  # per 5-hour bar, whole requests
    max_weekly_pico: int | None = None  # weekly credit, picodollars

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "account_id": self.account_id, "prefix": self.prefix,
                "created_ms": self.created_ms, "revoked": self.revoked, "models": list(self.models),
                "expires_ms": self.expires_ms, "disabled": self.disabled, "max_requests": self.max_requests,
                "max_weekly_usd": None if self.max_weekly_pico is None else self.max_weekly_pico / PICO_PER_DOLLAR}


@dataclass(frozen=True)
class UsageEvent:
    ts_ms: int
    account_id: str
    key_id: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    weight_units: int
    cost_pico: int
    status: str  # ok | error | aborted | refunded
    ttft_ms: int | None
    duration_ms: int
    lease_id: str = field(default="")

    def encode(self) -> bytes:
        packed: bytes = msgpack.packb([
            1, self.ts_ms, self.account_id, self.key_id, self.model, self.prompt_tokens,
            self.cached_tokens, self.completion_tokens, self.weight_units, self.cost_pico,
            self.status, self.ttft_ms, self.duration_ms, self.lease_id,
        ])
        return packed

    @staticmethod
    def decode(blob: bytes) -> UsageEvent:
        row = msgpack.unpackb(blob)
        if not isinstance(row, list) or not row or row[0] != 1:
            raise ValueError("unknown usage event encoding")
        return UsageEvent(*row[1:])


def day_of(ts_ms: int) -> str:
    """UTC calendar day, the unit of usage reports."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).strftime("%Y-%m-%d")
