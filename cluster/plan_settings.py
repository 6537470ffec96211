"""The `plans` block of the config: pack kinds, bar schedules, the weight rule.

Validated loudly (extra="forbid"); its defaults are SPEC §1's plans, so a
config without a `plans` block behaves exactly as before. `catalog()` turns
it into the pure `policies.plans.PlanCatalog` both stores and every view use.
"""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, field_validator, model_validator

from cluster.settings import StrictModel
from policies.plans import DEFAULT_CATALOG, BarSchedule, PackSpec, PlanCatalog
from policies.pricing import WeightBasis
from policies.units import MINUTE_MS, dollars_to_micro

_DEFAULT_REQUEST = DEFAULT_CATALOG.request_schedule
_DEFAULT_WEEKLY = DEFAULT_CATALOG.weekly_schedule


class ConcurrencySettings(StrictModel):
    """Requests a pack may run at once per model, by the model's size class."""

    standard: int = Field(1, ge=1, le=1000)
    small: int = Field(2, ge=1, le=1000)


class PackSettings(StrictModel):
    id: str = Field(min_length=1, max_length=40, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    name: str = Field("", max_length=100, description="display name")
    monthly_price: Decimal = Field(ge=0, description="dollars per month")
    requests: int = Field(ge=1, le=100_000, description="request-bar capacity, requests per 5 hours")
    weekly_credit: int = Field(ge=1, le=100_000, description="weekly token credit, whole dollars")
    concurrency: ConcurrencySettings = ConcurrencySettings()

    @field_validator("monthly_price")
    @classmethod
    def _cents(cls, value: Decimal) -> Decimal:
        if value * 100 != (value * 100).to_integral_value():
            raise ValueError("monthly_price is in dollars with at most 2 decimals")
        return value

    def spec(self) -> PackSpec:
        return PackSpec(self.requests, self.weekly_credit, self.concurrency.standard, self.concurrency.small,
                        int(self.monthly_price * 100), self.name or self.id)


class ScheduleSettings(StrictModel):
    """One bar's recharge: `tick_percent` of its capacity every `tick_minutes`."""

    tick_percent: int = Field(ge=1, le=100)
    tick_minutes: int = Field(ge=1, le=7 * 24 * 60)

    def schedule(self) -> BarSchedule:
        return BarSchedule(self.tick_percent, self.tick_minutes * MINUTE_MS)


class WeightSettings(StrictModel):
    """How much of the request bar one request costs: basis price / reference price.

    Give the reference as a price (`reference_price`, $/M) or as a catalog
    model (`reference_model`, whose basis price is then the reference), not
    both. `overrides` sets a model's weight outright; `unmetered` models weigh
    0 and cost nothing.
    """

    basis: WeightBasis = WeightBasis.OUTPUT
    reference_price: Decimal | None = Field(None, gt=0)
    reference_model: str | None = None
    overrides: dict[str, Decimal] = Field(default_factory=dict)
    unmetered: tuple[str, ...] = ()

    @field_validator("reference_price")
    @classmethod
    def _micro(cls, value: Decimal | None) -> Decimal | None:
        if value is not None:
            dollars_to_micro(value)
        return value

    @field_validator("overrides")
    @classmethod
    def _weights(cls, value: dict[str, Decimal]) -> dict[str, Decimal]:
        for model, weight in value.items():
            if weight < 0:
                raise ValueError(f"the weight override of {model} must not be negative")
        return value

    @model_validator(mode="after")
    def _one_reference(self) -> WeightSettings:
        if (self.reference_price is None) == (self.reference_model is None):
            raise ValueError("give exactly one of reference_price or reference_model")
        both = set(self.overrides) & set(self.unmetered)
        if both:
            raise ValueError(f"{sorted(both)[0]} is both unmetered and given a weight override")
        return self


def _default_packs() -> tuple[PackSettings, ...]:
    return tuple(
        PackSettings(id=kind, name=spec.name, monthly_price=Decimal(spec.monthly_price_cents) / 100,
                     requests=spec.requests, weekly_credit=spec.weekly_dollars,
                     concurrency=ConcurrencySettings(standard=spec.concurrency_standard,
                                                     small=spec.concurrency_small))
        for kind, spec in DEFAULT_CATALOG.packs.items())


class PlansSettings(StrictModel):
    packs: tuple[PackSettings, ...] = Field(default_factory=_default_packs, min_length=1)
    request_bar: ScheduleSettings = ScheduleSettings(
        tick_percent=_DEFAULT_REQUEST.tick_percent, tick_minutes=_DEFAULT_REQUEST.tick_ms // MINUTE_MS)
    weekly_bar: ScheduleSettings = ScheduleSettings(
        tick_percent=_DEFAULT_WEEKLY.tick_percent, tick_minutes=_DEFAULT_WEEKLY.tick_ms // MINUTE_MS)
    # None: the weight rule of the `admission` block (reference_price, weight_basis) applies.
    weights: WeightSettings | None = None
    cache_read_discount_percent: int | None = Field(None, ge=0, le=100,
                                                    description="None: admission's (80 by default)")

    @model_validator(mode="after")
    def _unique(self) -> PlansSettings:
        ids = [p.id for p in self.packs]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"pack kinds listed twice: {', '.join(dupes)}")
        return self

    def catalog(self) -> PlanCatalog:
        return PlanCatalog({p.id: p.spec() for p in self.packs}, self.request_bar.schedule(),
                           self.weekly_bar.schedule())
