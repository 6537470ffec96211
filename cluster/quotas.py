"""Quota views of a snapshot: the `/v2/quotas` body, response headers, reports.

The `/v2/quotas` shape is the one existing quota widgets already parse
(SPEC §2): credits as "$24.00" strings, times as ISO 8601 UTC.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any

from cluster.records import UsageEvent, day_of
from cluster.store import Snapshot
from policies.admission import month_bounds_ms
from policies.bars import next_tick_ms
from policies.plans import PlanKind
from policies.units import PICO_PER_DOLLAR, format_dollars_pico


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _num(value: Fraction) -> float | int:
    """JSON display of an exact level: an int when whole, else 4 decimals."""
    return int(value) if value.denominator == 1 else round(float(value), 4)


def requests_remaining(snap: Snapshot, request_unit: int) -> Fraction:
    assert snap.request is not None
    return Fraction(snap.request.level, request_unit)


def quotas_body(snap: Snapshot, request_unit: int) -> dict[str, Any]:
    account = snap.account
    now = snap.now_ms
    _, month_end = month_bounds_ms(now)
    if account.plan is PlanKind.PAYG:
        cap = account.spend_cap_pico
        return {
            "subscription": {"limit": 0, "requests": 0, "renewsAt": iso(month_end)},
            "payg": {
                "spentThisMonth": format_dollars_pico(snap.month_spend_pico),
                "spendCap": None if cap is None else format_dollars_pico(cap),
                "limited": cap is not None and snap.month_spend_pico >= cap,
                "resetsAt": iso(month_end),
            },
        }
    assert snap.request_spec and snap.request and snap.weekly_spec and snap.weekly
    limits = account.limits()
    remaining = requests_remaining(snap, request_unit)
    used = Fraction(limits.requests) - remaining
    r_next = next_tick_ms(snap.request_spec, snap.request, now)
    w_next = next_tick_ms(snap.weekly_spec, snap.weekly, now)
    weekly_level = snap.weekly.level
    return {
        "subscription": {"limit": limits.requests, "requests": _num(used), "renewsAt": iso(month_end)},
        "rollingFiveHourLimit": {
            "remaining": _num(remaining),
            "max": limits.requests,
            "limited": remaining < 1,
            "nextTickAt": iso(r_next) if r_next is not None else None,
            "tickPercent": limits.request_schedule.tick_percent,
        },
        "weeklyTokenLimit": {
            "percentRemaining": _num(Fraction(max(weekly_level, 0) * 100, snap.weekly_spec.capacity)),
            "maxCredits": format_dollars_pico(snap.weekly_spec.capacity),
            "remainingCredits": format_dollars_pico(weekly_level),
            "nextRegenAt": iso(w_next) if w_next is not None else None,
            "nextRegenCredits": format_dollars_pico(snap.weekly_spec.tick_amount),
        },
    }


def _usd(pico: int) -> str:
    """Header money: 6 decimals, enough for micro-dollar movements to show."""
    return f"{float(Fraction(pico, PICO_PER_DOLLAR)):.6f}"


def quota_headers(snap: Snapshot, request_unit: int) -> dict[str, str]:
    """Both bars' remaining amounts, from the same snapshot as the decision."""
    if snap.account.plan is PlanKind.PAYG:
        return {"x-packserve-plan": "payg", "x-packserve-month-spend-usd": _usd(snap.month_spend_pico)}
    assert snap.request is not None and snap.weekly is not None and snap.weekly_spec is not None
    limits = snap.account.limits()
    remaining = requests_remaining(snap, request_unit)
    return {
        "x-ratelimit-limit-requests": str(limits.requests),
        "x-ratelimit-remaining-requests": str(int(remaining)),
        "x-packserve-requests-remaining": f"{float(remaining):.4f}",
        "x-packserve-weekly-remaining-usd": _usd(snap.weekly.level),
        "x-packserve-weekly-limit-usd": f"{limits.weekly_dollars:.2f}",
    }


def usage_by_model_day(events: list[UsageEvent]) -> list[dict[str, Any]]:
    """Per (day, model): requests, tokens, dollars. Sorted by day then model."""
    rows: dict[tuple[str, str], dict[str, Any]] = defaultdict(lambda: {
        "requests": 0, "prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0,
        "cost_pico": 0, "weight_units": 0, "errors": 0})
    for e in events:
        row = rows[(day_of(e.ts_ms), e.model)]
        row["requests"] += 1
        row["prompt_tokens"] += e.prompt_tokens
        row["cached_tokens"] += e.cached_tokens
        row["completion_tokens"] += e.completion_tokens
        row["cost_pico"] += e.cost_pico
        row["weight_units"] += e.weight_units
        row["errors"] += e.status not in ("ok", "aborted")
    out = []
    for (day, model), row in sorted(rows.items()):
        cost = row.pop("cost_pico")
        out.append({"day": day, "model": model, **row, "cost_usd": format_dollars_pico(cost),
                    "cost_pico": cost})
    return out
