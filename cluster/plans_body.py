"""`GET /admin/v1/plans`: the configured pack kinds and bar schedules, as the `plans` block defines them.

Read-only and built from the catalog the stores use, so what it lists is what
admission applies (docs/plans.md names each field). Money is given both as
exact integers (cents, micro-dollars) and as display text.
"""

from __future__ import annotations

from typing import Any

from policies.plans import MAX_PACKS, BarSchedule, PlanCatalog
from policies.pricing import WeightPolicy
from policies.units import MINUTE_MS


def _schedule(schedule: BarSchedule) -> dict[str, int]:
    # Configured in whole minutes (cluster.plan_settings), so the division is exact.
    return {"tick_percent": schedule.tick_percent, "tick_minutes": schedule.tick_ms // MINUTE_MS,
            "tick_ms": schedule.tick_ms}


def _cents(cents: int) -> str:
    return f"{cents // 100}.{cents % 100:02d}"


def plans_body(catalog: PlanCatalog, weights: WeightPolicy) -> dict[str, Any]:
    return {
        "packs": [{
            "id": kind, "name": spec.name or kind,
            "monthly_price_usd": _cents(spec.monthly_price_cents), "monthly_price_cents": spec.monthly_price_cents,
            "requests": spec.requests, "weekly_credit_usd": spec.weekly_dollars,
            "concurrency": {"standard": spec.concurrency_standard, "small": spec.concurrency_small},
        } for kind, spec in catalog.packs.items()],
        "max_packs": MAX_PACKS,
        "request_bar": _schedule(catalog.request_schedule),
        "weekly_bar": _schedule(catalog.weekly_schedule),
        "weights": {"basis": weights.basis.value, "reference_price_micro": weights.reference_price_micro},
        # A whole percent in the config (cache_read_discount_percent), so this is exact.
        "cache_read_discount_percent": int(weights.cache_read_discount * 100),
    }
