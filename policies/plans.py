"""Packs, plans and the limits they add up to (SPEC §1), as data.

Contract: packs stack linearly. Capacities, recharge amounts and concurrency
are sums over the account's 1 to 5 packs, kinds mixed freely. Recharge is a
fixed percentage of the *total*, so it stacks too.

The pack kinds and both bars' schedules are a `PlanCatalog`, built by the
operator's config (cluster.plan_settings). `DEFAULT_CATALOG` is SPEC §1's:
the standard and founder packs, the request bar giving back 5% every 3
minutes, the weekly bar 2% every 180 minutes. Nothing else in the code, Python
or Lua, holds a plan figure.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from policies.bars import BarSpec
from policies.units import MINUTE_MS, PICO_PER_DOLLAR, REQUEST_SCALE

MAX_PACKS = 5


class PlanError(ValueError):
    """A plan that cannot exist (no packs, too many, an unknown kind)."""


class PackKind(StrEnum):
    """The seed's pack kind ids. Configured kinds are plain strings; these are two of them."""

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
class BarSchedule:
    """A bar gives back `tick_percent` of its capacity every `tick_ms`."""

    tick_percent: int
    tick_ms: int

    def __post_init__(self) -> None:
        if not 1 <= self.tick_percent <= 100 or self.tick_ms <= 0:
            raise PlanError(f"a bar schedule needs a tick of 1-100% and a positive interval, got {self!r}")

    def spec(self, capacity: int) -> BarSpec:
        # Capacities are multiples of REQUEST_SCALE or PICO_PER_DOLLAR, so the percentage is exact.
        return BarSpec(capacity, capacity * self.tick_percent // 100, self.tick_ms)


@dataclass(frozen=True)
class PackSpec:
    requests: int  # per 5-hour bar
    weekly_dollars: int  # weekly token bar, whole dollars
    concurrency_standard: int
    concurrency_small: int
    monthly_price_cents: int
    name: str = ""  # display name


REQUEST_SCHEDULE_SPEC1 = BarSchedule(5, 3 * MINUTE_MS)
WEEKLY_SCHEDULE_SPEC1 = BarSchedule(2, 180 * MINUTE_MS)


@dataclass(frozen=True)
class PlanCatalog:
    """Every pack kind an account may hold, and the two bars' schedules."""

    packs: Mapping[str, PackSpec]
    request_schedule: BarSchedule = REQUEST_SCHEDULE_SPEC1
    weekly_schedule: BarSchedule = WEEKLY_SCHEDULE_SPEC1

    def __post_init__(self) -> None:
        if not self.packs:
            raise PlanError("a plan catalog needs at least one pack kind")

    def parse_packs(self, raw: Sequence[str]) -> tuple[str, ...]:
        """Validate a pack list from config, the admin API or the CLI."""
        if isinstance(raw, str) or not isinstance(raw, Sequence):
            raise PlanError("packs must be a list such as [\"standard\", \"founder\"]")
        if len(raw) == 0:
            raise PlanError("a subscription needs at least 1 pack (0 packs means no access)")
        if len(raw) > MAX_PACKS:
            raise PlanError(f"at most {MAX_PACKS} packs per account, got {len(raw)}")
        kinds: list[str] = []
        for item in raw:
            if not isinstance(item, str) or item not in self.packs:
                known = ", ".join(self.packs)
                raise PlanError(f"unknown pack kind {item!r} (known: {known})")
            kinds.append(str(item))
        return tuple(kinds)

    def limits(self, packs: Sequence[str]) -> SubscriptionLimits:
        if not 1 <= len(packs) <= MAX_PACKS:
            raise PlanError(f"a subscription has 1 to {MAX_PACKS} packs, got {len(packs)}")
        missing = [p for p in packs if p not in self.packs]
        if missing:
            raise PlanError(f"pack kind {missing[0]!r} is not in the configured plans (known: {', '.join(self.packs)})")
        specs = [self.packs[p] for p in packs]
        return SubscriptionLimits(
            requests=sum(s.requests for s in specs),
            weekly_dollars=sum(s.weekly_dollars for s in specs),
            concurrency_standard=sum(s.concurrency_standard for s in specs),
            concurrency_small=sum(s.concurrency_small for s in specs),
            monthly_price_cents=sum(s.monthly_price_cents for s in specs),
            request_schedule=self.request_schedule,
            weekly_schedule=self.weekly_schedule,
        )


DEFAULT_CATALOG = PlanCatalog(
    packs={
        PackKind.STANDARD.value: PackSpec(500, 24, 1, 2, 3000, "Standard"),
        PackKind.FOUNDER.value: PackSpec(750, 36, 1, 2, 3000, "Founder's Edition"),
    },
)
PACKS: Mapping[str, PackSpec] = DEFAULT_CATALOG.packs


def parse_packs(raw: Sequence[str], catalog: PlanCatalog = DEFAULT_CATALOG) -> tuple[str, ...]:
    return catalog.parse_packs(raw)


@dataclass(frozen=True)
class SubscriptionLimits:
    """Summed capacities. `requests` is in whole requests; dollars whole dollars."""

    requests: int
    weekly_dollars: int
    concurrency_standard: int
    concurrency_small: int
    monthly_price_cents: int
    request_schedule: BarSchedule = field(default=REQUEST_SCHEDULE_SPEC1)
    weekly_schedule: BarSchedule = field(default=WEEKLY_SCHEDULE_SPEC1)

    def request_bar(self, request_unit: int) -> BarSpec:
        """`request_unit` is units per weight-1.0 request (see policies.units)."""
        return self.request_schedule.spec(self.requests * request_unit)

    def weekly_bar(self) -> BarSpec:
        return self.weekly_schedule.spec(self.weekly_dollars * PICO_PER_DOLLAR)

    def concurrency(self, size: SizeClass) -> int:
        return self.concurrency_small if size is SizeClass.SMALL else self.concurrency_standard


def request_unit(reference_price_micro: int) -> int:
    """Units of the request bar that one weight-1.0 request costs."""
    if reference_price_micro <= 0:
        raise PlanError("the reference price for request weights must be positive")
    return reference_price_micro * REQUEST_SCALE
