"""Usage alerts: a signed webhook when a bar crosses 80% or 100% used.

What fires, once per crossing (re-armed when the level is seen back below):
- `request_bar`, `weekly_bar`: a subscription's bars, from the snapshot of
  every admission and settlement;
- `payg_spend`: a payg account's month spend against its cap;
- `key_requests`, `key_weekly`: a key refused by its own cap (100%).

Out of the request path: the controller hands each snapshot to
`AlertMonitor.observe`, which only enqueues it; a background task compares it
with the thresholds and claims crossings in the store (`Store.claim_alert`,
atomic: with several gateways on one store only one claims a crossing). The
claimed alert is queued in the store, so `AlertSender` (one per gateway)
delivers it at least once, with exponential backoff, even if the gateway that
claimed it dies; each POST carries the alert id for the receiver to drop
repeats (`Packserve-Event-Id`).

Signature, as Stripe's: header `Packserve-Signature: t=<unix seconds>,v1=<hex>`
where hex = HMAC-SHA256(secret, f"{t}.{raw body}"). Receivers check it and
refuse a `t` too far from their clock (replays). See docs/plans.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import httpx
from pydantic import Field

from cluster.settings import StrictModel
from cluster.store import Snapshot, Store, StoreError
from policies.admission import Reason
from policies.plans import PlanKind

log = logging.getLogger("packserve.alerts")

SIGNATURE_HEADER = "Packserve-Signature"
EVENT_ID_HEADER = "Packserve-Event-Id"
QUEUE_MAX = 10_000
# How long a gateway trusts the last alert state it saw for a bar before asking
# the store again: another gateway may have re-armed it meanwhile.
KNOWN_TTL_S = 30.0


class AlertSettings(StrictModel):
    """The `alerts` block: where to POST, the shared secret, and the pacing of retries."""

    webhook_url: str | None = Field(None, pattern=r"^https?://")
    secret: str | None = Field(None, min_length=16, description="HMAC key; PACKSERVE_ALERT_SECRET overrides")
    thresholds: tuple[int, ...] = (80, 100)
    timeout_s: float = Field(5.0, gt=0, le=60)
    poll_interval_s: float = Field(1.0, gt=0, le=60)
    backoff_base_s: float = Field(2.0, gt=0)
    backoff_cap_s: float = Field(600.0, gt=0)
    max_attempts: int = Field(12, ge=1, le=100)

    @property
    def enabled(self) -> bool:
        return self.webhook_url is not None


def sign(secret: str, body: bytes, timestamp_s: int) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp_s}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp_s},v1={digest}"


def verify(secret: str, body: bytes, header: str, now_s: int, tolerance_s: int = 300) -> bool:
    """The receiver's check (also what docs/plans.md shows)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    if abs(now_s - timestamp) > tolerance_s:
        return False
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    return hmac.compare_digest(expected, parts.get("v1", ""))


def used_percent(snap: Snapshot) -> dict[str, Fraction]:
    """Each of the account's bars, as the fraction used (1 = empty bar or cap reached)."""
    out: dict[str, Fraction] = {}
    account = snap.account
    if account.plan is PlanKind.SUBSCRIPTION:
        if snap.request_spec is not None and snap.request is not None and snap.request_spec.capacity > 0:
            out["request_bar"] = 1 - Fraction(max(snap.request.level, 0), snap.request_spec.capacity)
        if snap.weekly_spec is not None and snap.weekly is not None and snap.weekly_spec.capacity > 0:
            out["weekly_bar"] = 1 - Fraction(max(snap.weekly.level, 0), snap.weekly_spec.capacity)
    elif account.spend_cap_pico:
        out["payg_spend"] = Fraction(snap.month_spend_pico, account.spend_cap_pico)
    return out


@dataclass(frozen=True)
class Observation:
    snapshot: Snapshot
    key_id: str
    refused: Reason | None = None


class AlertMonitor:
    """Turns observations into claimed crossings, in a background task."""

    def __init__(self, store: Store, settings: AlertSettings) -> None:
        self.store = store
        self.settings = settings
        self._queue: asyncio.Queue[Observation] = asyncio.Queue(QUEUE_MAX)
        # (account or key, name) -> last state this gateway wrote or saw: skips store calls that change nothing.
        self._known: dict[tuple[str, str], tuple[bool, float]] = {}
        self.claimed = 0

    def observe(self, snapshot: Snapshot | None, key_id: str, refused: Reason | None = None) -> None:
        if snapshot is None:
            return
        try:
            self._queue.put_nowait(Observation(snapshot, key_id, refused))
        except asyncio.QueueFull:
            log.warning("alert queue full: an observation was dropped")

    async def _mark(self, account_id: str, scope: str, name: str, above: bool, now_ms: int,
                    payload: dict[str, object]) -> None:
        known = self._known.get((scope, name))
        if known is not None and known[0] is above and known[1] > time.monotonic():
            return
        alert_id = "alrt_" + secrets.token_hex(12)
        body = json.dumps({"id": alert_id, **payload}, separators=(",", ":"))
        if await self.store.claim_alert(account_id, name, above, now_ms, alert_id, body):
            self.claimed += 1
            log.info("usage alert claimed", extra={"alert_id": alert_id, "account": account_id, "alert": name})
        self._known[(scope, name)] = (above, time.monotonic() + KNOWN_TTL_S)
        if len(self._known) > 100_000:
            self._known.clear()

    async def process(self, obs: Observation) -> None:
        snap = obs.snapshot
        account = snap.account
        base: dict[str, object] = {"type": "usage.threshold", "account_id": account.id,
                                   "created": snap.now_ms // 1000}
        for bar, used in used_percent(snap).items():
            for threshold in self.settings.thresholds:
                await self._mark(account.id, account.id, f"{bar}:{threshold}", used * 100 >= threshold, snap.now_ms,
                                 {**base, "bar": bar, "threshold": threshold,
                                  "used_percent": round(float(used) * 100, 2)})
        key_bars = {Reason.KEY_REQUEST_CAP_REACHED: "key_requests", Reason.KEY_WEEKLY_CAP_REACHED: "key_weekly"}
        if obs.key_id:
            for reason, bar in key_bars.items():
                # A key's cap is seen only when it refuses (100%); its next admission re-arms it.
                if obs.refused is reason or obs.refused is None:
                    await self._mark(account.id, obs.key_id, f"{bar}:{obs.key_id}:100", obs.refused is reason,
                                     snap.now_ms, {**base, "bar": bar, "threshold": 100, "key_id": obs.key_id})

    async def run(self) -> None:
        while True:
            obs = await self._queue.get()
            try:
                await self.process(obs)
            except StoreError as exc:
                log.warning("usage alert check failed: %s", exc)


class AlertSender:
    """Delivers queued alerts: signed POSTs, retried with backoff until a 2xx or `max_attempts`."""

    def __init__(self, store: Store, settings: AlertSettings, secret: str, clock_ms: Callable[[], int],
                 client: httpx.AsyncClient | None = None) -> None:
        assert settings.webhook_url is not None
        self.store = store
        self.settings = settings
        self.url = settings.webhook_url
        self.secret = secret
        self.clock_ms = clock_ms
        self.client = client or httpx.AsyncClient(timeout=settings.timeout_s)
        self.delivered = 0
        self.polls = 0

    async def _send(self, alert_id: str, payload: str, attempts: int) -> None:
        body = payload.encode()
        headers = {"content-type": "application/json", EVENT_ID_HEADER: alert_id,
                   SIGNATURE_HEADER: sign(self.secret, body, int(time.time()))}
        try:
            r = await self.client.post(self.url, content=body, headers=headers)
            ok = 200 <= r.status_code < 300
            problem = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            ok, problem = False, type(exc).__name__
        if ok:
            self.delivered += 1
            await self.store.alert_done(alert_id)
        elif attempts >= self.settings.max_attempts:
            log.error("usage alert dropped after %d attempts", attempts, extra={"alert_id": alert_id})
            await self.store.alert_done(alert_id)
        else:
            log.warning("usage alert delivery failed (%s), will retry", problem,
                        extra={"alert_id": alert_id, "attempt": attempts})

    async def poll_once(self) -> int:
        taken = await self.store.take_alerts(self.clock_ms(), 50, int(self.settings.backoff_base_s * 1000),
                                             int(self.settings.backoff_cap_s * 1000))
        await asyncio.gather(*(self._send(*row) for row in taken))
        self.polls += 1
        return len(taken)

    async def run(self) -> None:
        while True:
            try:
                await self.poll_once()
            except StoreError as exc:
                log.warning("usage alert poll failed: %s", exc)
            await asyncio.sleep(self.settings.poll_interval_s)

    async def close(self) -> None:
        await self.client.aclose()


class Alerts:
    """The monitor and the sender of one gateway, started and stopped with it."""

    def __init__(self, store: Store, settings: AlertSettings, secret: str, clock_ms: Callable[[], int]) -> None:
        self.monitor = AlertMonitor(store, settings)
        self.sender = AlertSender(store, settings, secret, clock_ms)
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self.monitor.run(), name="packserve-alert-monitor"),
                       loop.create_task(self.sender.run(), name="packserve-alert-sender")]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.sender.close()
