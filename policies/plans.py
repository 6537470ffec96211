"""Packs, plans and the limits they add up to (SPEC §1).

Contract: packs stack linearly. Capacities, recharge amounts and concurrency
are sums over the account's 1 to 5 packs, kinds mixed freely. Recharge is a
fixed percentage of the *total*, so it stacks too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from policies.bars import BarSpec
from policies.units import MINUTE_MS, PICO_PER_DOLLAR, REQUEST_SCALE

MAX_PACKS = 5
REQUEST_TICK_PERCENT = 5
REQUEST_TICK_MS = 3 * MINUTE_MS
WEEKLY_TICK_PERCENT = 2
WEEKLY_TICK_MS = 180 * MINUTE_MS


class PlanError(ValueError):
    """A plan that cannot exist (no packs, too many, an unknown kind)."""


class PackKind(StrEnum):
    STANDARD = "standard"
    FOUNDER = "founder"


class SizeClass(StrEnum):
    STANDARD = "standard"
    SMALL = "small"
    UNMETERED = "unmetered"


class PlanKind(StrEnum):
    SUBSCRIPTION = "subscription"
    PAYG = "payg"


@dataclass(frozen=True)
class PackSpec:
    requests: int  # per 5-hour bar
    weekly_dollars: int  # weekly token bar, whole dollars
    concurrency_standard: int
    concurrency_small: int
    monthly_price_cents: int


PACKS: Mapping[PackKind, PackSpec] = {
    PackKind.STANDARD: PackSpec(500, 24, 1, 2, 3000),
    PackKind.FOUNDER: PackSpec(750, 36, 1, 2, 3000),
}


def parse_packs(raw: Sequence[str]) -> tuple[PackKind, ...]:
    """Validate a pack list from config, the admin API or the CLI."""
    if isinstance(raw, str) or not isinstance(raw, Sequence):
        raise PlanError("packs must be a list such as [\"standard\", \"founder\"]")
    if len(raw) == 0:
        raise PlanError("a subscription needs at least 1 pack (0 packs means no access)")
    if len(raw) > MAX_PACKS:
        raise PlanError(f"at most {MAX_PACKS} packs per account, got {len(raw)}")
    kinds: list[PackKind] = []
    for item in raw:
        try:
            kinds.append(PackKind(item))
        except ValueError:
            known = ", ".join(k.value for k in PackKind)
            raise PlanError(f"unknown pack kind {item!r} (known: {known})") from None
    return tuple(kinds)


@dataclass(frozen=True)
class SubscriptionLimits:
    """Summed capacities. `requests` is in whole requests; dollars whole dollars."""

    requests: int
    weekly_dollars: int
    concurrency_standard: int
    concurrency_small: int
    monthly_price_cents: int

    def request_bar(self, request_unit: int) -> BarSpec:
        """`request_unit` is units per weight-1.0 request (see policies.units)."""
        capacity = self.requests * request_unit
        return BarSpec(capacity, capacity * REQUEST_TICK_PERCENT // 100, REQUEST_TICK_MS)

    def weekly_bar(self) -> BarSpec:
        capacity = self.weekly_dollars * PICO_PER_DOLLAR
        return BarSpec(capacity, capacity * WEEKLY_TICK_PERCENT // 100, WEEKLY_TICK_MS)

    def concurrency(self, size: SizeClass) -> int:
        return self.concurrency_small if size is SizeClass.SMALL else self.concurrency_standard


def subscription_limits(packs: Sequence[PackKind]) -> SubscriptionLimits:
    if not 1 <= len(packs) <= MAX_PACKS:
        raise PlanError(f"a subscription has 1 to {MAX_PACKS} packs, got {len(packs)}")
    specs = [PACKS[p] for p in packs]
    return SubscriptionLimits(
        requests=sum(s.requests for s in specs),
        weekly_dollars=sum(s.weekly_dollars for s in specs),
        concurrency_standard=sum(s.concurrency_standard for s in specs),
        concurrency_small=sum(s.concurrency_small for s in specs),
        monthly_price_cents=sum(s.monthly_price_cents for s in specs),
    )


def request_unit(reference_price_micro: int) -> int:
    """Units of the request bar that one weight-1.0 request costs."""
    if reference_price_micro <= 0:
        raise PlanError("the reference price for request weights must be positive")
    return reference_price_micro * REQUEST_SCALE
