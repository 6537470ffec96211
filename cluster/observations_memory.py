"""The embedded store's observations: in memory, for the one gateway process it serves.

Like the embedded store's model capacity (cluster/capacity_book.py), this is
about the live process: a restart empties it, which is what a heartbeat list
should do, and loses the refusal history of the last retention period.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence

from cluster.observations import Bounds, GatewayBeat, ModelRecent, RefusalEvent, Sample, SampleKind


class MemoryObservations:
    def __init__(self, clock: Callable[[], int]) -> None:
        self._clock = clock
        self._beats: dict[str, GatewayBeat] = {}
        self._refusals: dict[str, deque[RefusalEvent]] = {}
        self._samples: dict[tuple[str, SampleKind], deque[tuple[int, int]]] = {}
        self._buckets: dict[int, Counter[tuple[str, str]]] = {}

    def _now(self, now_ms: int | None) -> int:
        return self._clock() if now_ms is None else now_ms

    async def beat(self, beat: GatewayBeat, ttl_ms: int, now_ms: int | None = None) -> GatewayBeat:
        now = self._now(now_ms)
        written = GatewayBeat(beat.gateway_id, beat.started_ms, beat.version, beat.address, beat.in_flight, now,
                              now + ttl_ms)
        self._beats[beat.gateway_id] = written
        return written

    async def gateways(self, now_ms: int | None = None) -> list[GatewayBeat]:
        now = self._now(now_ms)
        for gone in [g for g, b in self._beats.items() if b.expires_ms <= now]:
            del self._beats[gone]
        return sorted(self._beats.values(), key=lambda b: (b.started_ms, b.gateway_id))

    async def gateway_gone(self, gateway_id: str) -> None:
        self._beats.pop(gateway_id, None)

    async def record(self, refusals: Sequence[RefusalEvent], samples: Sequence[Sample], bounds: Bounds) -> None:
        for r in refusals:
            self._refusals.setdefault(r.account_id, deque(maxlen=bounds.per_account)).appendleft(r)
            self._buckets.setdefault(r.ts_ms // bounds.bucket_ms, Counter())[(r.model, r.reason)] += 1
        for s in samples:
            self._samples.setdefault((s.model, s.kind), deque(maxlen=bounds.per_model)).append((s.ts_ms, s.ms))
        latest = max([r.ts_ms for r in refusals] + [s.ts_ms for s in samples], default=None)
        if latest is not None:
            # Forget what no read can ask for any more, as the Redis keys expire.
            oldest = (latest - bounds.window_ms) // bounds.bucket_ms - 1
            for bucket in [b for b in self._buckets if b < oldest]:
                del self._buckets[bucket]

    async def account_refusals(self, account_id: str, since_ms: int, limit: int) -> list[RefusalEvent]:
        # Newest first by arrival; batches from several sources may interleave, so order by time too.
        rows = [r for r in self._refusals.get(account_id, ()) if r.ts_ms >= since_ms]
        rows.sort(key=lambda r: r.ts_ms, reverse=True)
        return rows[:limit]

    async def recent(self, since_ms: int, until_ms: int, bounds: Bounds) -> dict[str, ModelRecent]:
        waits: dict[str, list[int]] = {}
        ttfts: dict[str, list[int]] = {}
        for (model, kind), rows in self._samples.items():
            kept = [ms for ts, ms in rows if ts >= since_ms]
            if kept:
                (waits if kind is SampleKind.WAIT else ttfts)[model] = kept
        reasons: dict[str, Counter[str]] = {}
        for bucket in bounds.buckets(since_ms, until_ms):
            for (model, reason), n in self._buckets.get(bucket, Counter()).items():
                reasons.setdefault(model, Counter())[reason] += n
        return {model: ModelRecent(tuple(waits.get(model, ())), tuple(ttfts.get(model, ())),
                                   dict(reasons.get(model, Counter())))
                for model in {*waits, *ttfts, *reasons}}

    async def forget_account(self, account_id: str) -> None:
        self._refusals.pop(account_id, None)
