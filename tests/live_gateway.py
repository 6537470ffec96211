"""A live gateway for tests: uvicorn on a free port, in its own thread and event loop.

The gateway runs exactly the code `packserve gateway --engine sim` runs, on
a real store (Redis from the conftest fixture, or the embedded store), and
tests talk to it over HTTP with the official SDKs. A fake clock can be
injected so bar arithmetic is tested without waiting.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import uvicorn

from serve_apps.config import AppConfig
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.gateway.app import GatewayRuntime, build_gateway_app, create_runtime

ADMIN_TOKEN = "test-admin-token"
T = TypeVar("T")


def wait_for(check: Callable[..., Any], what: str, attempts: int = 500) -> None:
    """Poll `check` every 10 ms, `attempts` times at most (a bound in polls, so a slow machine waits longer)."""
    for _ in range(attempts):
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LiveGateway:
    def __init__(self, *, redis_url: str | None, data_dir: Path, clock: Callable[[], int | None] | None = None,
                 queue_timeout_s: float = 60, ttft_s: float = 0.0, tokens_per_s: float = 0.0,
                 lease_ttl_s: float = 30, max_body_bytes: int | None = None,
                 scheduler: dict[str, Any] | None = None, sim_max_seqs: int | None = None,
                 extra: dict[str, dict[str, Any]] | None = None) -> None:
        admission = {"queue_timeout_s": queue_timeout_s, "lease_ttl_s": lease_ttl_s}
        # Every test gateway shares the session's Redis and 127.0.0.1, where the invalid-key limiter counts
        # per address across gateways: tests of other things present bad keys often enough to trip it, so
        # it is set out of their way here (tests/test_abuse.py tests it with its own limit).
        gateway: dict[str, Any] = {"auth_failures_per_minute": 1_000_000}
        if max_body_bytes is not None:
            gateway["max_body_bytes"] = max_body_bytes
        raw: dict[str, dict[str, Any]] = {
            "store": {"redis_url": redis_url, "data_dir": str(data_dir)},
            "admission": admission, "gateway": gateway, "scheduler": scheduler or {},
            "sim": {"max_seqs": sim_max_seqs}}
        for section, values in (extra or {}).items():  # more config, merged per top-level block
            raw[section] = {**raw.get(section, {}), **values}
        self.config = AppConfig.model_validate(raw)
        self.engine = SimulatedEngine(ttft_s=ttft_s, tokens_per_s=tokens_per_s, max_seqs=sim_max_seqs)
        self.clock = clock
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.runtime: GatewayRuntime | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, name=f"gateway-{self.port}", daemon=True)
        self._error: BaseException | None = None
        self.admin = httpx.Client(base_url=self.base_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
                                  timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # surfaced by start()
            self._error = exc

    async def _serve(self) -> None:
        self.loop = asyncio.get_running_loop()
        cards = {c.id: c for c in self.engine.cards()}
        kwargs: dict[str, Any] = {"admin_token": ADMIN_TOKEN, "address": f"127.0.0.1:{self.port}"}
        if self.clock is not None:
            kwargs["clock"] = self.clock
        self.runtime = await create_runtime(self.config, {cid: self.engine for cid in cards}, cards, **kwargs)
        app = build_gateway_app(self.runtime)
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                     access_log=False, lifespan="on"))
        await self._server.serve()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the gateway's own loop (its store connections live there)."""
        assert self.loop is not None, "gateway not started"
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def start(self) -> LiveGateway:
        self._thread.start()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self._error is not None:
                raise RuntimeError(f"gateway failed to start: {self._error!r}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=0.5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        raise RuntimeError("gateway did not answer /health within 20 s")

    def stop(self) -> None:
        self.admin.close()
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(timeout=15)

    def __enter__(self) -> LiveGateway:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- admin helpers ------------------------------------------------------------

    def create_account(self, packs: list[str] | None = None, **body: Any) -> dict[str, Any]:
        payload = {"name": "test", "plan": "subscription", "packs": packs or ["standard"], **body}
        if payload["plan"] == "payg":
            payload.pop("packs")
        r = self.admin.post("/admin/v1/accounts", json=payload)
        assert r.status_code == 201, r.text
        return dict(r.json())

    def new_key(self, packs: list[str] | None = None, **body: Any) -> tuple[str, str]:
        """(account id, API key secret) for a fresh account."""
        account = self.create_account(packs, **body)
        r = self.admin.post(f"/admin/v1/accounts/{account['id']}/keys")
        assert r.status_code == 201, r.text
        return account["id"], str(r.json()["key"])

    def quotas(self, key: str) -> dict[str, Any]:
        r = httpx.get(f"{self.base_url}/v2/quotas", headers={"authorization": f"Bearer {key}"}, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def usage_events(self, account_id: str) -> list[dict[str, Any]]:
        r = self.admin.get(f"/admin/v1/accounts/{account_id}/usage/export")
        assert r.status_code == 200, r.text
        return [json.loads(line) for line in r.text.splitlines() if line.strip()]
