"""What this gateway saw in the last minutes: refusals (with account, key, model and reason), capacity
waits and times to first token per model.

The console reads it through `/v2/refusals` (a customer's own 429s) and
`/admin/v1/stats` (per-model percentiles and refusals by reason). It is kept
in memory per gateway and bounded: the Prometheus histograms in /metrics are
the long-term record; this answers "what is happening now" without a query
language.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

WINDOW_MS = 10 * 60 * 1000
MAX_EVENTS = 20_000


@dataclass(frozen=True)
class Refusal:
    ts_ms: int
    account_id: str
    key_id: str
    model: str
    reason: str
    status: int


def percentile(values: list[int], q: int) -> int | None:
    """The nearest-rank q-th percentile (q in 0..100) of whole milliseconds; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-q * len(ordered) // 100))  # ceil(q/100 * n), at least the first
    return ordered[rank - 1]


class RecentWindow:
    def __init__(self, now_ms: Callable[[], int], window_ms: int = WINDOW_MS, max_events: int = MAX_EVENTS) -> None:
        self.now_ms = now_ms
        self.window_ms = window_ms
        self.refusals: deque[Refusal] = deque(maxlen=max_events)
        self.waits: deque[tuple[int, str, int]] = deque(maxlen=max_events)
        self.ttfts: deque[tuple[int, str, int]] = deque(maxlen=max_events)

    def refused(self, account_id: str, key_id: str, model: str, reason: str, status: int) -> None:
        self.refusals.append(Refusal(self.now_ms(), account_id, key_id, model, reason, status))

    def waited(self, model: str, wait_ms: int) -> None:
        self.waits.append((self.now_ms(), model, wait_ms))

    def first_token(self, model: str, ttft_ms: int) -> None:
        self.ttfts.append((self.now_ms(), model, ttft_ms))

    def _since(self) -> int:
        return self.now_ms() - self.window_ms

    def account_refusals(self, account_id: str, limit: int = 50) -> list[dict[str, Any]]:
        """The account's refusals in the window, newest first."""
        since = self._since()
        rows = [r for r in reversed(self.refusals) if r.account_id == account_id and r.ts_ms >= since]
        return [{"ts_ms": r.ts_ms, "key_id": r.key_id, "model": r.model, "reason": r.reason, "status": r.status}
                for r in rows[:limit]]

    def model_summary(self) -> dict[str, dict[str, Any]]:
        """Per model in the window: p50/p95 capacity wait and TTFT (ms), and refusals by reason."""
        since = self._since()
        waits: dict[str, list[int]] = {}
        ttfts: dict[str, list[int]] = {}
        reasons: dict[str, Counter[str]] = {}
        for ts, model, ms in self.waits:
            if ts >= since:
                waits.setdefault(model, []).append(ms)
        for ts, model, ms in self.ttfts:
            if ts >= since:
                ttfts.setdefault(model, []).append(ms)
        for r in self.refusals:
            if r.ts_ms >= since:
                reasons.setdefault(r.model, Counter())[r.reason] += 1
        out: dict[str, dict[str, Any]] = {}
        for model in sorted({*waits, *ttfts, *reasons}):
            w, t = waits.get(model, []), ttfts.get(model, [])
            out[model] = {"wait_p50_ms": percentile(w, 50), "wait_p95_ms": percentile(w, 95),
                          "ttft_p50_ms": percentile(t, 50), "ttft_p95_ms": percentile(t, 95),
                          "served": len(t), "refusals": dict(sorted(reasons.get(model, Counter()).items()))}
        return out
