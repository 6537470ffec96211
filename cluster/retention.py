"""Usage retention: events older than the retention window are deleted from the store.

Settling trims the settling account's own old events, but an account that
stops sending requests would keep its history for ever; this purge, run by
every gateway once per period, removes them for every account. Deleting is
idempotent, so several gateways running it at once only repeat work.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from cluster.store import Store, StoreError

log = logging.getLogger("packserve.retention")

DEFAULT_PERIOD_S = 3600.0


async def purge_once(store: Store, retention_ms: int, now_ms: int | None) -> int | None:
    """Delete usage older than `now_ms - retention_ms` (None: the wall clock); how many, or None if the
    store was away (the next period retries)."""
    now = time.time_ns() // 1_000_000 if now_ms is None else now_ms
    try:
        removed = await store.purge_usage(now - retention_ms)
    except StoreError as exc:
        log.warning("usage retention purge failed: store unreachable", extra={"error": str(exc)})
        return None
    if removed:
        log.info("usage past retention deleted", extra={"events": removed, "retention_ms": retention_ms})
    return removed


async def purge_forever(store: Store, retention_ms: int, clock: Callable[[], int | None],
                        period_s: float = DEFAULT_PERIOD_S) -> None:
    """Purge now, then every `period_s`, until cancelled."""
    while True:
        await purge_once(store, retention_ms, clock())
        await asyncio.sleep(period_s)
