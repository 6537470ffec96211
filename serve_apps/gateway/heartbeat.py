"""This gateway's heartbeat in the store: how the console counts and lists the live gateways.

Every `console.heartbeat_interval_s` the gateway writes its id, start time,
version, address and requests in flight, live for `console.heartbeat_ttl_s`.
A clean stop removes it at once; a killed gateway drops out when its TTL
passes. A store that does not answer only skips a beat (logged).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable

from cluster.observations import GatewayBeat, Observations, ObservationSettings
from cluster.store import StoreError

log = logging.getLogger("packserve.gateway")


def package_version() -> str:
    try:
        return importlib.metadata.version("packserve")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def default_address() -> str:
    """Where a gateway runs when its port is not its own to know (a Ray Serve ingress replica)."""
    return f"{socket.gethostname()} pid {os.getpid()}"


class Heartbeat:
    def __init__(self, observations: Observations, settings: ObservationSettings, in_flight: Callable[[], int],
                 clock: Callable[[], int | None], address: str | None = None) -> None:
        self.observations = observations
        self.settings = settings
        self.in_flight = in_flight
        self.clock = clock  # None from it: the store's clock
        self.gateway_id = f"gw-{uuid.uuid4().hex[:12]}"
        self.started_ms = clock() or time.time_ns() // 1_000_000
        self.version = package_version()
        self.address = address or default_address()

    def record(self) -> GatewayBeat:
        return GatewayBeat(self.gateway_id, self.started_ms, self.version, self.address, self.in_flight())

    async def beat(self) -> GatewayBeat | None:
        try:
            return await self.observations.beat(self.record(), self.settings.heartbeat_ttl_ms, self.clock())
        except StoreError as exc:
            log.warning("gateway heartbeat not stored", extra={"error": str(exc), "gateway": self.gateway_id})
            return None

    async def run_forever(self) -> None:
        while True:
            await self.beat()
            await asyncio.sleep(self.settings.heartbeat_interval_s)

    async def stop(self) -> None:
        """Leave the live list now rather than when the TTL passes."""
        try:
            await self.observations.gateway_gone(self.gateway_id)
        except StoreError as exc:
            log.warning("gateway heartbeat not removed", extra={"error": str(exc), "gateway": self.gateway_id})
