"""Request weights and token costs (SPEC §1).

Contract:
- weight(model) = basis_price / reference_price, unrounded, held exactly as
  request-bar units (see policies.units). The basis is the output price by
  default; an operator may choose the input price, change the reference, or
  override a model's weight. Unmetered models weigh 0 and cost 0.
- token cost = (uncached_in × in + cached_in × in × (1 − discount) + out × out) / 1e6 dollars,
  in picodollars. The cache-read discount (80%) applies to subscriptions only.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from fractions import Fraction

from policies.plans import SizeClass, request_unit
from policies.units import REQUEST_SCALE

# SPEC §1's default; an operator sets their own (plans.cache_read_discount_percent).
CACHE_READ_DISCOUNT = Fraction(80, 100)


class WeightBasis(StrEnum):
    OUTPUT = "output"
    INPUT = "input"


class UsageError(ValueError):
    """Token counts that cannot be real."""


@dataclass(frozen=True)
class ModelPrice:
    input_micro: int  # micro-dollars per million input tokens
    output_micro: int
    size_class: SizeClass
    weight_override: Fraction | None = None

    @property
    def unmetered(self) -> bool:
        return self.size_class is SizeClass.UNMETERED


@dataclass(frozen=True)
class WeightPolicy:
    reference_price_micro: int = 3_400_000
    basis: WeightBasis = WeightBasis.OUTPUT
    cache_read_discount: Fraction = CACHE_READ_DISCOUNT

    @property
    def unit(self) -> int:
        return request_unit(self.reference_price_micro)

    def units(self, price: ModelPrice) -> int:
        """Request-bar units one request to this model costs."""
        if price.unmetered:
            return 0
        if price.weight_override is not None:
            exact = price.weight_override * self.unit
            # Overrides are operator decimals; half-up keeps them within one unit.
            return int(exact + Fraction(1, 2)) if exact.denominator != 1 else int(exact)
        basis = price.output_micro if self.basis is WeightBasis.OUTPUT else price.input_micro
        return basis * REQUEST_SCALE

    def weight(self, price: ModelPrice) -> Fraction:
        return Fraction(self.units(price), self.unit)


def validate_usage(prompt_tokens: int, cached_tokens: int, completion_tokens: int) -> None:
    for name, value in (("prompt_tokens", prompt_tokens), ("cached_tokens", cached_tokens),
                        ("completion_tokens", completion_tokens)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UsageError(f"{name} must be an integer, got {value!r}")
        if value < 0:
            raise UsageError(f"{name} must not be negative, got {value}")
    if cached_tokens > prompt_tokens:
        raise UsageError(f"cached_tokens ({cached_tokens}) exceeds prompt_tokens ({prompt_tokens})")


def token_cost_pico(price: ModelPrice, prompt_tokens: int, cached_tokens: int, completion_tokens: int,
                    *, cache_discount: bool, discount: Fraction = CACHE_READ_DISCOUNT) -> int:
    """Cost in picodollars. `prompt_tokens` includes the cached ones.

    The discounted cache-read part is rounded up to the next picodollar (only
    when a price is not a multiple of 5 micro-dollars), so rounding never
    favours the customer over the list price by more than 1e-12 $.
    """
    validate_usage(prompt_tokens, cached_tokens, completion_tokens)
    if price.unmetered:
        return 0
    uncached = prompt_tokens - cached_tokens
    if not 0 <= discount <= 1:
        raise ValueError(f"a cache-read discount is a fraction from 0 to 1, got {discount}")
    cached_factor = (1 - discount) if cache_discount else Fraction(1)
    cached_cost = cached_tokens * price.input_micro * cached_factor
    cached_pico = -(-cached_cost.numerator // cached_cost.denominator)
    return uncached * price.input_micro + cached_pico + completion_tokens * price.output_micro
