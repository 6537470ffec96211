"""Operator settings for admission and state, validated loudly (extra="forbid").

Environment variables override the file for the store URL and secrets:
PACKSERVE_REDIS_URL, PACKSERVE_DATA_DIR, PACKSERVE_ADMIN_TOKEN.
"""

from __future__ import annotations

import os
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from policies.fairness import MAX_WEIGHT, SchedulerMode
from policies.plans import SizeClass
from policies.pricing import ModelPrice, WeightBasis, WeightPolicy
from policies.units import DAY_MS, dollars_to_micro


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AdmissionSettings(StrictModel):
    queue_timeout_s: float = Field(60.0, ge=0, le=3600, description="0 = refuse at once when no slot is free")
    lease_ttl_s: float = Field(30.0, gt=0, le=3600)
    usage_retention_days: int = Field(14, ge=1, le=3650)
    reference_price: Decimal = Field(Decimal("3.40"), gt=0, description="$/M price of a weight-1.0 request")
    weight_basis: WeightBasis = WeightBasis.OUTPUT
    cache_read_discount_percent: int = Field(80, ge=0, le=100, description="subscriptions' cache-read discount")
    dashboard_url: str | None = Field(None, pattern=r"^https?://", description="named in 429 messages")

    @field_validator("reference_price")
    @classmethod
    def _micro_precision(cls, value: Decimal) -> Decimal:
        dollars_to_micro(value)
        return value

    @property
    def weight_policy(self) -> WeightPolicy:
        return WeightPolicy(dollars_to_micro(self.reference_price), self.weight_basis,
                            Fraction(self.cache_read_discount_percent, 100))

    @property
    def retention_ms(self) -> int:
        return self.usage_retention_days * DAY_MS

    @property
    def lease_ttl_ms(self) -> int:
        return int(self.lease_ttl_s * 1000)


class SchedulerSettings(StrictModel):
    """Dispatch of a saturated model (SPEC §4). In YAML, `scheduler: fifo` is short for `{mode: fifo}`."""

    mode: SchedulerMode = SchedulerMode.FAIR
    # How long an admitted request waits for a free sequence before it is refused as overloaded
    # (uncharged). None: the concurrency queue's admission.queue_timeout_s, one wait bound for both.
    queue_timeout_s: float | None = Field(None, ge=0, le=3600)
    # Capacity leases; None: admission.lease_ttl_s. A dead gateway's sequences come back within it.
    lease_ttl_s: float | None = Field(None, gt=0, le=3600)
    # How often a streaming response's service is added to its account's counter (and its lease renewed).
    charge_interval_s: float = Field(1.0, gt=0, le=60)
    # A waiting request re-checks this often even without a wake-up (a lost pub/sub message).
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    payg_weight: int = Field(1, ge=1, le=MAX_WEIGHT, description="the fairness weight of a payg account")
    # Fair mode: a full model dispatches a request of an account with nothing running at once, and its
    # engine pauses a sequence of an account holding several (it resumes at the next free sequence).
    preempt: bool = True
    overload_retry_after_s: int = Field(5, ge=1, le=3600)

    def timeout_s(self, admission: AdmissionSettings) -> float:
        return admission.queue_timeout_s if self.queue_timeout_s is None else self.queue_timeout_s

    def lease_ttl_ms(self, admission: AdmissionSettings) -> int:
        return admission.lease_ttl_ms if self.lease_ttl_s is None else int(self.lease_ttl_s * 1000)


class PriceSettings(StrictModel):
    """A catalog model's price card, as the operator writes it (dollars per million tokens)."""

    input: Decimal = Field(Decimal(0), ge=0)
    output: Decimal = Field(Decimal(0), ge=0)
    size_class: SizeClass = SizeClass.STANDARD
    weight: Decimal | None = Field(None, ge=0, description="override of output/reference")

    def to_price(self) -> ModelPrice:
        return ModelPrice(
            input_micro=dollars_to_micro(self.input),
            output_micro=dollars_to_micro(self.output),
            size_class=self.size_class,
            weight_override=None if self.weight is None else Fraction(self.weight),
        )


def default_data_dir() -> Path:
    raw = os.environ.get("PACKSERVE_DATA_DIR")
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "packserve"


def redis_url_from_env() -> str | None:
    return os.environ.get("PACKSERVE_REDIS_URL") or None


def admin_token_from_env() -> str | None:
    return os.environ.get("PACKSERVE_ADMIN_TOKEN") or None
