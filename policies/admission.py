"""The admission decision and settlement arithmetic (SPEC §1), pure.

Contract, in order, for a subscription:
  1. request bar ≥ weight, else `request_bar_empty` with Retry-After = time
     until enough ticks have landed;
  2. weekly bar > 0, else `weekly_tokens_exhausted`, Retry-After likewise;
  3. concurrency is checked by the store (it owns the leases); a request that
     finds no slot is charged nothing.
On admission the request bar is debited by the weight. Settlement debits the
weekly bar by the real cost (it may go negative by at most that cost) and,
for a failure before the first token, refunds the weight.

For payg: no bars; an optional monthly spend cap (calendar month, UTC).

The Lua scripts in cluster/lua/ implement the same arithmetic; the JSON
vectors in policies/vectors/ run against both.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from policies.bars import BarSpec, BarState, ceil_seconds, debit, ms_until_level, ms_until_positive, settle


class Reason(StrEnum):
    REQUEST_BAR_EMPTY = "request_bar_empty"
    WEEKLY_TOKENS_EXHAUSTED = "weekly_tokens_exhausted"
    CONCURRENCY_LIMIT = "concurrency_limit"
    SPEND_CAP_REACHED = "spend_cap_reached"
    ACCOUNT_SUSPENDED = "account_suspended"
    KEY_REQUEST_CAP_REACHED = "key_request_cap_reached"
    KEY_WEEKLY_CAP_REACHED = "key_weekly_cap_reached"


@dataclass(frozen=True)
class Admit:
    request: BarState
    weekly: BarState


@dataclass(frozen=True)
class Refuse:
    reason: Reason
    retry_after_ms: int | None  # None: waiting will not help

    @property
    def retry_after_s(self) -> int | None:
        return None if self.retry_after_ms is None else max(1, ceil_seconds(self.retry_after_ms))


def check_bars(request_spec: BarSpec, request: BarState, weekly_spec: BarSpec, weekly: BarState,
               weight_units: int, now_ms: int) -> Admit | Refuse:
    """Steps 1 and 2. On Admit, `request` is already debited by the weight."""
    req = settle(request_spec, request, now_ms)
    wk = settle(weekly_spec, weekly, now_ms)
    if req.level < weight_units:
        return Refuse(Reason.REQUEST_BAR_EMPTY, ms_until_level(request_spec, req, weight_units, now_ms))
    if wk.level <= 0:
        return Refuse(Reason.WEEKLY_TOKENS_EXHAUSTED, ms_until_positive(weekly_spec, wk, now_ms))
    if weight_units == 0:
        return Admit(req, wk)
    return Admit(debit(request_spec, req, weight_units, now_ms), wk)


def check_key_bars(request_spec: BarSpec | None, request: BarState | None, weekly_spec: BarSpec | None,
                   weekly: BarState | None, weight_units: int, now_ms: int) -> Admit | Refuse:
    """A key's own caps, after the account's bars admitted the request.

    A key cap is a bar of its own with the plan's schedule: `None` specs mean
    no cap. Same order and arithmetic as check_bars; on Admit the key's
    request bar is already debited.
    """
    req = None if request_spec is None or request is None else settle(request_spec, request, now_ms)
    wk = None if weekly_spec is None or weekly is None else settle(weekly_spec, weekly, now_ms)
    if request_spec is not None and req is not None and req.level < weight_units:
        return Refuse(Reason.KEY_REQUEST_CAP_REACHED, ms_until_level(request_spec, req, weight_units, now_ms))
    if weekly_spec is not None and wk is not None and wk.level <= 0:
        return Refuse(Reason.KEY_WEEKLY_CAP_REACHED, ms_until_positive(weekly_spec, wk, now_ms))
    if request_spec is not None and req is not None and weight_units:
        req = debit(request_spec, req, weight_units, now_ms)
    return Admit(req if req is not None else BarState(0), wk if wk is not None else BarState(0))


def settle_weekly(weekly_spec: BarSpec, weekly: BarState, cost_pico: int, now_ms: int) -> BarState:
    if cost_pico < 0:
        raise ValueError("a token cost cannot be negative")
    if cost_pico == 0:
        return settle(weekly_spec, weekly, now_ms)
    return debit(weekly_spec, weekly, cost_pico, now_ms)


def refund_request(request_spec: BarSpec, request: BarState, weight_units: int, now_ms: int) -> BarState:
    """Give a failed-before-first-token request its weight back (never above capacity)."""
    if weight_units == 0:
        return settle(request_spec, request, now_ms)
    return debit(request_spec, request, -weight_units, now_ms)


def month_bounds_ms(now_ms: int) -> tuple[int, int]:
    """[start, end) of the UTC calendar month holding `now_ms`."""
    t = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    start = datetime(t.year, t.month, 1, tzinfo=UTC)
    end = datetime(t.year + (t.month == 12), t.month % 12 + 1, 1, tzinfo=UTC)
    return int(start.timestamp() * 1000), int(end.timestamp() * 1000)


def check_spend_cap(spent_pico: int, cap_pico: int | None, now_ms: int) -> Refuse | None:
    if cap_pico is None or spent_pico < cap_pico:
        return None
    _, end = month_bounds_ms(now_ms)
    return Refuse(Reason.SPEND_CAP_REACHED, end - now_ms)


def concurrency_allows(active_leases: int, limit: int, waiters_ahead: int) -> bool:
    """FIFO: a slot goes to a newcomer only when everyone queued before it is served."""
    return active_leases + waiters_ahead < limit
