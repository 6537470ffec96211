"""Exact units used by every bar and cost.

- Money is in picodollars (1e-12 $): `tokens × price_micro_per_million` is then
  an integer with no division, so token costs are exact. $180 (5 founder packs)
  is 1.8e14 pico, far below 2**53, so the Lua side (doubles) is exact too.
- The request bar is in "request units": one request of weight 1.0 is
  `reference_price_micro × REQUEST_SCALE` units, and a model costs its basis
  price in micro-dollars × REQUEST_SCALE. A $2.00/M model against a $3.40/M
  reference is therefore exactly 2_000_000/3_400_000 of a request, and 850 of
  them fill exactly 500 requests. REQUEST_SCALE = 100 keeps every percentage
  tick (5% of any capacity) an integer.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal

PICO_PER_MICRO = 1_000_000
PICO_PER_DOLLAR = 1_000_000_000_000
MICRO_PER_DOLLAR = 1_000_000
REQUEST_SCALE = 100
MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS


def dollars_to_micro(value: str | int | Decimal) -> int:
    """Parse a price like "3.40" into micro-dollars, refusing sub-micro precision."""
    d = Decimal(str(value))
    micro = d * MICRO_PER_DOLLAR
    if micro != micro.to_integral_value() or micro < 0:
        raise ValueError(f"price {value!r} must be a non-negative amount with at most 6 decimals")
    return int(micro)


def format_dollars_pico(pico: int) -> str:
    """"$24.00"-style display, rounded half-up to cents ("-$0.12" when negative)."""
    cents = (Decimal(pico) / Decimal(PICO_PER_DOLLAR / 100)).quantize(Decimal(1), rounding=ROUND_HALF_UP)
    sign = "-" if cents < 0 else ""
    cents = abs(cents)
    return f"{sign}${int(cents) // 100}.{int(cents) % 100:02d}"
