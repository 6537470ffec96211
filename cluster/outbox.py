"""Settlements that could not reach the store yet.

A Redis outage must not lose a usage record. A failed settle is kept here
and retried with backoff; with a spool file it also survives a gateway
restart. Replays are safe because the store settles each lease id once.
The slot itself is not at risk: its lease expires on its own (TTL).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

import msgpack

from cluster.records import UsageEvent
from cluster.store import Lease, Settlement, Store, StoreError

log = logging.getLogger("packserve.outbox")


def _encode(s: Settlement) -> list[object]:
    lease = s.lease
    return [lease.lease_id, lease.account_id, lease.model, lease.weight_units, lease.admitted_ms,
            lease.expires_ms, s.cost_pico, s.refund_units, s.event.encode(), s.retention_ms]


def _decode(row: list[object]) -> Settlement:
    lease = Lease(str(row[0]), str(row[1]), str(row[2]), int(str(row[3])), int(str(row[4])), int(str(row[5])))
    blob = row[8]
    assert isinstance(blob, bytes)
    return Settlement(lease, int(str(row[6])), int(str(row[7])), UsageEvent.decode(blob), int(str(row[9])))


class SettleOutbox:
    def __init__(self, store: Store, spool: Path | None = None, max_backoff_s: float = 5.0) -> None:
        self._store = store
        self._spool = spool
        self._max_backoff = max_backoff_s
        self._pending: dict[str, Settlement] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        if spool is not None and spool.exists():
            for row in msgpack.unpackb(spool.read_bytes()):
                s = _decode(row)
                self._pending[s.lease.lease_id] = s

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, settlement: Settlement) -> None:
        self._pending[settlement.lease.lease_id] = settlement
        self._persist()
        self.start()
        self._wake.set()

    def start(self) -> None:
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def flush(self) -> int:
        """Try every pending settlement once; returns how many are still pending."""
        for lease_id, s in list(self._pending.items()):
            try:
                await self._store.settle(s)
            except StoreError:
                continue
            self._pending.pop(lease_id, None)
        self._persist()
        return len(self._pending)

    async def _drain(self) -> None:
        backoff = 0.1
        while self._pending:
            left = await self.flush()
            if left == 0:
                break
            log.warning("settlements pending, store unreachable", extra={"pending": left})
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            backoff = min(self._max_backoff, backoff * 2)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._persist()

    def _persist(self) -> None:
        if self._spool is None:
            return
        if not self._pending:
            self._spool.unlink(missing_ok=True)
            return
        tmp = self._spool.with_suffix(".tmp")
        tmp.write_bytes(msgpack.packb([_encode(s) for s in self._pending.values()]))
        os.replace(tmp, self._spool)
