"""Refusals (with account, key, model and reason), capacity waits and times to first token, for the console.

The request path only appends to a buffer here; the buffer goes to the store
(`store.observations`, shared by every gateway) in one batch at most every
`console.flush_interval_s`, after the answers it describes, so a request pays
no store round trip for it. Reads come from the store, so `/v2/refusals` and
the operator's per-model figures are the same on every gateway (this
gateway's own buffer is written first). The Prometheus histograms in /metrics
stay the long-term record; this answers "what is happening now" without a
query language.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from cluster.observations import (
    Observations,
    ObservationSettings,
    RefusalEvent,
    Sample,
    SampleKind,
    model_summary,
)
from cluster.observations_memory import MemoryObservations
from cluster.store import StoreError

log = logging.getLogger("packserve.gateway")

# Events held while the store does not answer; past it the oldest are dropped (the console is best effort).
MAX_BUFFERED = 20_000
REFUSALS_SHOWN = 50


class RecentWindow:
    def __init__(self, now_ms: Callable[[], int], observations: Observations | None = None,
                 settings: ObservationSettings | None = None) -> None:
        self.now_ms = now_ms
        self.settings = settings or ObservationSettings()
        self.bounds = self.settings.bounds()
        # Without a store (a service built alone), this process's memory.
        self.observations: Observations = observations or MemoryObservations(now_ms)
        self._refusals: list[RefusalEvent] = []
        self._samples: list[Sample] = []
        self._flusher: asyncio.Task[None] | None = None
        self.dropped = 0

    @property
    def window_ms(self) -> int:
        return self.bounds.window_ms

    # -- the request path: append only ----------------------------------------

    def refused(self, account_id: str, key_id: str, model: str, reason: str, status: int) -> None:
        self._refusals.append(RefusalEvent(self.now_ms(), account_id, key_id, model, reason, status))
        self._schedule()

    def waited(self, model: str, wait_ms: int) -> None:
        self._samples.append(Sample(self.now_ms(), model, SampleKind.WAIT, wait_ms))
        self._schedule()

    def first_token(self, model: str, ttft_ms: int) -> None:
        self._samples.append(Sample(self.now_ms(), model, SampleKind.TTFT, ttft_ms))
        self._schedule()

    def _schedule(self) -> None:
        excess = len(self._refusals) + len(self._samples) - MAX_BUFFERED
        if excess > 0:  # the store has not answered for a while: the oldest go, samples first
            from_samples = min(excess, len(self._samples))
            del self._samples[:from_samples]
            del self._refusals[:excess - from_samples]
            self.dropped += excess
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        while self._refusals or self._samples:
            if self.settings.flush_interval_s > 0:
                await asyncio.sleep(self.settings.flush_interval_s)
            await self.flush()

    async def flush(self) -> None:
        """Write what is buffered in one batch; on a store error it is dropped and logged."""
        refusals, samples = self._refusals, self._samples
        if not refusals and not samples:
            return
        self._refusals, self._samples = [], []
        try:
            await self.observations.record(refusals, samples, self.bounds)
        except StoreError as exc:
            self.dropped += len(refusals) + len(samples)
            log.warning("console events not stored", extra={"error": str(exc), "events": len(refusals) + len(samples)})

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError, StoreError):
                await self._flusher
        await self.flush()

    # -- reads: the whole cluster's, from the store -------------------------------

    async def account_refusals(self, account_id: str, limit: int = REFUSALS_SHOWN) -> list[dict[str, Any]]:
        """The account's refusals within the retention, newest first."""
        await self.flush()
        since = self.now_ms() - self.bounds.retention_ms
        return [r.to_json() for r in await self.observations.account_refusals(account_id, since, limit)]

    async def model_summary(self) -> dict[str, dict[str, Any]]:
        """Per model in the window: p50/p95 capacity wait and TTFT (ms), and refusals by reason."""
        await self.flush()
        now = self.now_ms()
        return model_summary(await self.observations.recent(now - self.bounds.window_ms, now, self.bounds))
