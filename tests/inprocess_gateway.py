"""The real gateway app called in-process (httpx.ASGITransport): no sockets, so thousands of
requests a minute, for fuzzing and hostile-input tests.

The app, store, controller and simulated engine are exactly what
`packserve gateway --engine sim` runs; only the transport differs. One event
loop per harness runs everything (the store's connections live on it), and
tests call `request()` synchronously.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from fastapi import FastAPI

from cluster.store import Snapshot
from serve_apps.config import AppConfig
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.gateway.app import GatewayRuntime, build_gateway_app, create_runtime

ADMIN_TOKEN = "fuzz-admin-token"
T = TypeVar("T")


class InProcessGateway:
    def __init__(self, data_dir: Path, *, redis_url: str | None = None, clock: Callable[[], int | None] | None = None,
                 client_host: str = "203.0.113.7", gateway: Mapping[str, Any] | None = None) -> None:
        self.config = AppConfig.model_validate({
            "store": {"redis_url": redis_url, "data_dir": str(data_dir)},
            "admission": {"queue_timeout_s": 0}, "gateway": dict(gateway or {})})
        self.engine = SimulatedEngine()
        self.loop = asyncio.new_event_loop()
        cards = {c.id: c for c in self.engine.cards()}
        kwargs: dict[str, Any] = {"admin_token": ADMIN_TOKEN}
        if clock is not None:
            kwargs["clock"] = clock
        self.runtime: GatewayRuntime = self.run(
            create_runtime(self.config, {cid: self.engine for cid in cards}, cards, **kwargs))
        self.app: FastAPI = build_gateway_app(self.runtime)
        self.run(self._start())
        self._clients: dict[str, httpx.AsyncClient] = {}
        self.client_host = client_host

    async def _start(self) -> None:
        self.runtime.controller.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def client(self, host: str | None = None) -> httpx.AsyncClient:
        """A client whose requests come from `host` (the ASGI scope's client address)."""
        host = host or self.client_host
        if host not in self._clients:
            transport = httpx.ASGITransport(app=self.app, client=(host, 50000))
            self._clients[host] = httpx.AsyncClient(transport=transport, base_url="http://gateway.test", timeout=30)
        return self._clients[host]

    def request(self, method: str, path: str, *, host: str | None = None, **kw: Any) -> httpx.Response:
        async def go() -> httpx.Response:
            response = await self.client(host).request(method, path, **kw)
            await self.settled()
            return response
        return self.run(go())

    async def settled(self) -> None:
        """Wait until every settlement this gateway started has reached the store."""
        pending = self.runtime.controller._settling  # the only handle on the background settlements
        while pending:
            await asyncio.gather(*list(pending), return_exceptions=True)

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        return self.request(method, f"/admin/v1{path}", headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, **kw)

    def new_key(self, packs: list[str] | None = None) -> tuple[str, str]:
        """(account id, API key secret) for a fresh subscription account."""
        r = self.admin("POST", "/accounts", json={"name": "t", "plan": "subscription",
                                                   "packs": packs or ["standard"]})
        assert r.status_code == 201, r.text
        account_id = str(r.json()["id"])
        k = self.admin("POST", f"/accounts/{account_id}/keys")
        assert k.status_code == 201, k.text
        return account_id, str(k.json()["key"])

    def charges(self, account_id: str) -> tuple[int | None, int | None, int]:
        """(request bar level, weekly bar level, charged usage events): what a refused request must not move.

        A request refused after admission (a prompt too long for the model) leaves a usage event
        with status "refunded", weight 0 and cost 0: a record, not a charge.
        """
        return self.run(self._charges(account_id))

    def usage_events(self, account_id: str) -> int:
        return len(self.run(self.runtime.store.usage(account_id)))

    async def _charges(self, account_id: str) -> tuple[int | None, int | None, int]:
        snap: Snapshot = await self.runtime.store.snapshot(account_id, self.runtime.controller._now_ms())
        events = await self.runtime.store.usage(account_id)
        charged = sum(1 for e in events if e.weight_units or e.cost_pico)
        return (None if snap.request is None else snap.request.level,
                None if snap.weekly is None else snap.weekly.level, charged)

    def close(self) -> None:
        async def go() -> None:
            for c in self._clients.values():
                await c.aclose()
            await self.runtime.close()
        self.run(go())
        self.loop.close()
