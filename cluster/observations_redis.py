"""Observations on Redis, shared by every gateway (the interface and its bounds: cluster/observations.py).

Key schema (prefix `packserve:`):

  packserve:gateways              zset    gateway id -> heartbeat expiry ms (lua/gateway_beat.lua)
  packserve:gateway               hash    gateway id -> '<seen ms>|<JSON beat>'
  packserve:{A}:refusals          list    the account's refusals, newest first, JSON [ts, key id, model,
                                          reason, status]; capped, expires after the retention
  packserve:obs:refused:<bucket>  hash    '<model>|<reason>' -> refusals in that time bucket; expires
                                          after the window
  packserve:obs:{M}:wait|ttft     list    '<ts ms>:<ms>' samples of model M, newest first; capped,
                                          expires after the window
  packserve:obs:models            set     models that have samples (found by readers)

A batch of events is one pipelined round trip (`record`); the heartbeat and
the gateway list are one script each, with time from Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

from redis.asyncio import Redis

from cluster.observations import Bounds, GatewayBeat, ModelRecent, RefusalEvent, Sample, SampleKind

Errors = Callable[[], AbstractContextManager[None]]
Script = Callable[[str, Sequence[str], Sequence[str | int]], Any]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisObservations:
    def __init__(self, client: Redis, prefix: str, errors: Errors, run: Script,
                 clock: Callable[[], int | None] | None = None) -> None:
        self._client = client
        self._prefix = prefix
        self._errors = errors
        self._run = run  # the store's script runner (its errors mapped to StoreError)
        self._clock = clock

    def _now_arg(self, now_ms: int | None) -> str | int:
        if now_ms is None and self._clock is not None:
            now_ms = self._clock()
        return "" if now_ms is None else now_ms

    @property
    def _gateway_keys(self) -> list[str]:
        return [f"{self._prefix}gateways", f"{self._prefix}gateway"]

    def _account_key(self, account_id: str) -> str:
        return f"{self._prefix}{{{account_id}}}:refusals"

    def _bucket_key(self, bucket: int) -> str:
        return f"{self._prefix}obs:refused:{bucket}"

    def _sample_key(self, model: str, kind: SampleKind) -> str:
        return f"{self._prefix}obs:{{{model}}}:{kind.value}"

    @property
    def _models_key(self) -> str:
        return f"{self._prefix}obs:models"

    # -- gateways -----------------------------------------------------------

    async def beat(self, beat: GatewayBeat, ttl_ms: int, now_ms: int | None = None) -> GatewayBeat:
        seen, expires = await self._run("gateway_beat", self._gateway_keys,
                                        [self._now_arg(now_ms), beat.gateway_id, beat.encode(), ttl_ms])
        return GatewayBeat(beat.gateway_id, beat.started_ms, beat.version, beat.address, beat.in_flight, int(seen),
                           int(expires))

    async def gateways(self, now_ms: int | None = None) -> list[GatewayBeat]:
        flat = await self._run("gateways", self._gateway_keys, [self._now_arg(now_ms)])
        out = []
        for i in range(1, len(flat), 3):
            seen, _, record = _text(flat[i + 2]).partition("|")
            out.append(GatewayBeat.decode(record, int(seen), int(float(_text(flat[i + 1])))))
        return sorted(out, key=lambda b: (b.started_ms, b.gateway_id))

    async def gateway_gone(self, gateway_id: str) -> None:
        zset, records = self._gateway_keys
        with self._errors():
            async with self._client.pipeline(transaction=True) as pipe:
                pipe.zrem(zset, gateway_id)
                pipe.hdel(records, gateway_id)
                await pipe.execute()

    # -- events -------------------------------------------------------------

    async def record(self, refusals: Sequence[RefusalEvent], samples: Sequence[Sample], bounds: Bounds) -> None:
        if not refusals and not samples:
            return
        pipe = self._client.pipeline(transaction=False)
        for account_id in dict.fromkeys(r.account_id for r in refusals):
            key = self._account_key(account_id)
            pipe.lpush(key, *[r.encode() for r in refusals if r.account_id == account_id])
            pipe.ltrim(key, 0, bounds.per_account - 1)
            pipe.pexpire(key, bounds.retention_ms)
        counts = Counter((r.ts_ms // bounds.bucket_ms, f"{r.model}|{r.reason}") for r in refusals)
        for bucket in {b for b, _ in counts}:
            key = self._bucket_key(bucket)
            for (b, field), n in counts.items():
                if b == bucket:
                    pipe.hincrby(key, field, n)
            pipe.pexpire(key, bounds.window_ms + 2 * bounds.bucket_ms)
        series = {(s.model, s.kind) for s in samples}
        for model, kind in series:
            key = self._sample_key(model, kind)
            pipe.lpush(key, *[f"{s.ts_ms}:{s.ms}" for s in samples if (s.model, s.kind) == (model, kind)])
            pipe.ltrim(key, 0, bounds.per_model - 1)
            pipe.pexpire(key, bounds.window_ms)
        if series:
            pipe.sadd(self._models_key, *{model for model, _ in series})
        with self._errors():
            await pipe.execute()

    async def account_refusals(self, account_id: str, since_ms: int, limit: int) -> list[RefusalEvent]:
        with self._errors():
            rows = await self._client.lrange(self._account_key(account_id), 0, -1)
        events = [RefusalEvent.decode(account_id, row) for row in rows]
        # Batches from several gateways interleave in the list: order by the events' own times.
        events = [e for e in events if e.ts_ms >= since_ms]
        events.sort(key=lambda e: e.ts_ms, reverse=True)
        return events[:limit]

    async def recent(self, since_ms: int, until_ms: int, bounds: Bounds) -> dict[str, ModelRecent]:
        buckets = list(bounds.buckets(since_ms, until_ms))
        with self._errors():
            models = sorted(_text(m) for m in await self._client.smembers(self._models_key))
            pipe = self._client.pipeline(transaction=False)
            for model in models:
                for kind in SampleKind:
                    pipe.lrange(self._sample_key(model, kind), 0, -1)
            for bucket in buckets:
                pipe.hgetall(self._bucket_key(bucket))
            replies = await pipe.execute()
        series: dict[tuple[str, SampleKind], tuple[int, ...]] = {}
        at = 0
        for model in models:
            for kind in SampleKind:
                kept = []
                for row in reversed(replies[at]):  # oldest first
                    ts, _, ms = _text(row).partition(":")
                    if int(ts) >= since_ms:
                        kept.append(int(ms))
                series[(model, kind)] = tuple(kept)
                at += 1
        reasons: dict[str, Counter[str]] = {}
        for counts in replies[at:]:
            for field, n in counts.items():
                model, _, reason = _text(field).rpartition("|")
                reasons.setdefault(model, Counter())[reason] += int(n)
        names = {m for (m, _), values in series.items() if values} | set(reasons)
        return {model: ModelRecent(series.get((model, SampleKind.WAIT), ()), series.get((model, SampleKind.TTFT), ()),
                                   dict(reasons.get(model, Counter())))
                for model in names}

    async def forget_account(self, account_id: str) -> None:
        with self._errors():
            await self._client.delete(self._account_key(account_id))
