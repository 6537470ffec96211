"""Recharging bars ("stamina bars") with lazy, discrete ticks.

Contract:
- A bar has an integer `capacity` and gains `tick_amount` every `tick_ms`,
  never above capacity. Levels are integers in the bar's own unit, so sums and
  comparisons are exact.
- Ticks are computed lazily from `anchor_ms`, the start of the interval in
  progress. Settling advances the anchor by whole intervals only, so the part
  of an interval already elapsed is carried across updates, never lost.
- A full bar has no running interval (`anchor_ms is None`): its tick clock
  starts when it first drops below full.
- A level may be negative (the weekly bar after an expensive request); ticks
  then recharge it like any other level.

Invariant: `anchor_ms is None` exactly when `level >= capacity` after settling.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BarSpec:
    capacity: int
    tick_amount: int
    tick_ms: int

    def __post_init__(self) -> None:
        if self.capacity < 0 or self.tick_amount <= 0 or self.tick_ms <= 0:
            raise ValueError(f"invalid bar spec {self!r}")


@dataclass(frozen=True)
class BarState:
    level: int
    anchor_ms: int | None = None

    @staticmethod
    def full(spec: BarSpec) -> BarState:
        return BarState(spec.capacity, None)


def settle(spec: BarSpec, state: BarState, now_ms: int) -> BarState:
    """Apply every tick that has landed by `now_ms`."""
    if state.level >= spec.capacity:
        # A shrunk capacity (fewer packs) clamps; a full bar accrues nothing.
        return BarState(spec.capacity, None)
    anchor = now_ms if state.anchor_ms is None else state.anchor_ms
    if now_ms <= anchor:
        return BarState(state.level, anchor)
    ticks = (now_ms - anchor) // spec.tick_ms
    if ticks == 0:
        return BarState(state.level, anchor)
    level = state.level + ticks * spec.tick_amount
    if level >= spec.capacity:
        return BarState(spec.capacity, None)
    return BarState(level, anchor + ticks * spec.tick_ms)


def rescale(old: BarSpec, new: BarSpec, state: BarState, now_ms: int) -> BarState:
    """Carry a bar across a capacity change (pack change, plan edit, new reference price).

    Rule: the remaining fraction is kept. The bar is settled under the capacity
    it was recorded against, then its level becomes level × new / old, rounded
    down (never up: a change must not refill by even one unit). A full bar
    stays full, an empty one stays empty, a negative weekly level stays
    proportionally negative, and the running tick interval keeps its anchor.
    """
    s = settle(old, state, now_ms)
    if s.anchor_ms is None or old.capacity <= 0:
        return BarState(new.capacity, None)
    if old.capacity == new.capacity:
        return settle(new, s, now_ms)
    return settle(new, BarState(s.level * new.capacity // old.capacity, s.anchor_ms), now_ms)


def debit(spec: BarSpec, state: BarState, amount: int, now_ms: int) -> BarState:
    """Settle, then take `amount` (which may be negative: a refund)."""
    s = settle(spec, state, now_ms)
    level = s.level - amount
    if level >= spec.capacity:
        return BarState(spec.capacity, None)
    return BarState(level, now_ms if s.anchor_ms is None else s.anchor_ms)


def next_tick_ms(spec: BarSpec, state: BarState, now_ms: int) -> int | None:
    """When the next tick lands, or None for a full bar."""
    s = settle(spec, state, now_ms)
    if s.anchor_ms is None:
        return None
    return s.anchor_ms + spec.tick_ms


def ms_until_level(spec: BarSpec, state: BarState, target: int, now_ms: int) -> int | None:
    """Milliseconds from `now_ms` until the level is at least `target`.

    0 if it already is; None if it never will be (target above capacity).
    """
    s = settle(spec, state, now_ms)
    if s.level >= target:
        return 0
    if target > spec.capacity:
        return None
    assert s.anchor_ms is not None
    ticks = -(-(target - s.level) // spec.tick_amount)
    return s.anchor_ms + ticks * spec.tick_ms - now_ms


def ms_until_positive(spec: BarSpec, state: BarState, now_ms: int) -> int | None:
    """Milliseconds until the level is strictly above zero."""
    return ms_until_level(spec, state, 1, now_ms) if spec.capacity >= 1 else None


def ceil_seconds(ms: int) -> int:
    """Retry-After is whole seconds, rounded up so a client never retries early."""
    return -(-ms // 1000)
