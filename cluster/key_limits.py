"""Per-key limits: a model allow-list, an expiry, a disabled flag, and caps.

The access rules (allow-list, expiry, disabled) are checked by the gateway
before admission, so a refused request is never charged; they answer 403.
The caps are the key's own share of the account's bars: a request bar of
`max_requests` and a weekly bar of `max_weekly_pico`, both recharging on the
plan's schedule, checked and debited by the store in the same atomic step as
the account's bars (policies.admission.check_key_bars); reaching one answers
429. A key's changes apply at once on the gateway that made them and within
the authentication cache's few seconds on the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation

from cluster.records import ApiKey
from policies.bars import BarSpec
from policies.plans import PlanError, SubscriptionLimits
from policies.units import PICO_PER_DOLLAR

MAX_MODELS = 100


@dataclass(frozen=True)
class KeyRefusal:
    status: int
    code: str
    message: str


def check_key_access(key: ApiKey, model: str, now_ms: int) -> KeyRefusal | None:
    if key.disabled:
        return KeyRefusal(403, "key_disabled", f"this API key ({key.prefix}…) is disabled by the account's operator")
    if key.expires_ms is not None and now_ms >= key.expires_ms:
        when = datetime.fromtimestamp(key.expires_ms / 1000, tz=UTC).isoformat(timespec="seconds")
        return KeyRefusal(403, "key_expired", f"this API key ({key.prefix}…) expired at {when.replace('+00:00', 'Z')}")
    if key.models and model not in key.models:
        return KeyRefusal(403, "model_not_allowed",
                          f"this API key may not use the model '{model}'; its model allow-list is: "
                          f"{', '.join(key.models)}")
    return None


def key_bar_specs(key: ApiKey, limits: SubscriptionLimits, request_unit: int) -> tuple[BarSpec | None, BarSpec | None]:
    """The key's own bars, on the plan's schedules; None where the key has no cap."""
    req = None if key.max_requests is None else limits.request_schedule.spec(key.max_requests * request_unit)
    wk = None if key.max_weekly_pico is None else limits.weekly_schedule.spec(key.max_weekly_pico)
    return req, wk


def parse_expiry(value: str | int | None) -> int | None:
    """An ISO 8601 time ("2027-01-01T00:00:00Z", a date) or epoch milliseconds."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise PlanError("expires must be an ISO 8601 time or epoch milliseconds")
    if isinstance(value, int):
        if value <= 0:
            raise PlanError("expires must be a positive epoch-millisecond time")
        return value
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise PlanError(f"expires must be an ISO 8601 time such as 2027-01-01T00:00:00Z, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def with_limits(key: ApiKey, *, models: Sequence[str] | None = None, expires: str | int | None = None,
                max_requests: int | None = None, max_weekly_usd: str | float | int | None = None,
                disabled: bool | None = None, clear: Sequence[str] = ()) -> ApiKey:
    """`key` with the given limits validated and applied; `clear` names limits to remove."""
    changes: dict[str, object] = {}
    if models is not None:
        if isinstance(models, str) or len(models) > MAX_MODELS or not all(isinstance(m, str) and m for m in models):
            raise PlanError(f"models must be a list of at most {MAX_MODELS} model ids")
        changes["models"] = tuple(dict.fromkeys(models))
    if expires is not None:
        changes["expires_ms"] = parse_expiry(expires)
    if max_requests is not None:
        if isinstance(max_requests, bool) or not isinstance(max_requests, int) or not 1 <= max_requests <= 1_000_000:
            raise PlanError("max_requests must be a whole number of requests from 1 to 1000000")
        changes["max_requests"] = max_requests
    if max_weekly_usd is not None:
        try:
            dollars = Decimal(str(max_weekly_usd))
        except InvalidOperation:
            raise PlanError(f"max_weekly_usd must be a dollar amount, got {max_weekly_usd!r}") from None
        if not dollars.is_finite() or dollars <= 0 or dollars * 100 != (dollars * 100).to_integral_value():
            raise PlanError("max_weekly_usd must be a positive dollar amount with at most 2 decimals")
        changes["max_weekly_pico"] = int(dollars * PICO_PER_DOLLAR)
    if disabled is not None:
        changes["disabled"] = bool(disabled)
    for name in clear:
        field = {"models": "models", "expires": "expires_ms", "max_requests": "max_requests",
                 "max_weekly_usd": "max_weekly_pico"}.get(name)
        if field is None:
            raise PlanError(f"unknown limit {name!r} (models, expires, max_requests, max_weekly_usd)")
        changes[field] = () if field == "models" else None
    return replace(key, **changes)  # type: ignore[arg-type]
