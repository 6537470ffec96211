"""The gateway application: one FastAPI app serving both APIs, quotas, health, metrics, admin.

Built by `build_gateway_app` from a `GatewayRuntime` (settings, store,
controller, engines), so the same code runs under plain uvicorn
(`packserve gateway`) and as the Ray Serve ingress (`packserve serve`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, JSONResponse, Response

from cluster.accounts import Accounts
from cluster.admin import AdminOps
from cluster.alerts import Alerts
from cluster.controller import AdmissionController, Clock, store_clock
from cluster.open_store import open_store
from cluster.outbox import SettleOutbox
from cluster.plans_body import plans_body
from cluster.quotas import quotas_body
from cluster.retention import purge_forever
from cluster.scheduler import Scheduler
from cluster.settings import default_data_dir
from cluster.store import CapacityStats, NotFound, Store, StoreError
from policies.fairness import WEIGHT_SCALE
from policies.plans import SizeClass
from policies.pricing import ModelPrice
from serve_apps.config import AppConfig
from serve_apps.engines.types import Engine, ModelCard
from serve_apps.gateway.admin_routes import build_admin_router, check_admin_token
from serve_apps.gateway.anthropic_routes import build_anthropic_router
from serve_apps.gateway.auth_guard import AuthFailureGuard
from serve_apps.gateway.errors import (
    ApiError,
    UnknownModel,
    error_response,
    invalid_api_key,
    not_served,
    store_unavailable,
)
from serve_apps.gateway.heartbeat import Heartbeat
from serve_apps.gateway.metrics import Metrics
from serve_apps.gateway.openai_routes import build_openai_router
from serve_apps.gateway.page_headers import page_headers
from serve_apps.gateway.recent import RecentWindow
from serve_apps.gateway.responses_routes import build_responses_router
from serve_apps.gateway.service import GatewayService

log = logging.getLogger("packserve.gateway")

STATIC = Path(__file__).resolve().parent.parent / "static"
STATIC_FILES = {"console.js": "text/javascript; charset=utf-8", "charts.js": "text/javascript; charset=utf-8",
                "console.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
# How many accounts /admin/v1/stats lists per model, lowest counter first.
TOP_ACCOUNTS = 10

Replicas = Callable[[str], int | None]


def model_capacity(config: AppConfig, replicas: Replicas | None = None) -> Callable[[str], int | None]:
    """Sequences a model runs at once across its live replicas; None: not capacity-scheduled.

    Per replica: the model's `max_inflight`, else its engine's limit (vLLM's
    max_num_seqs, the simulated engine's max_seqs). Replicas: `replicas(model)`
    (Ray Serve's running count; under `packserve gateway`, one). A model seen at
    zero replicas, or not seen yet, counts one: requests wait for its cold start
    before admission, and one replica is what it starts with.
    """

    def capacity(model: str) -> int | None:
        per_replica = config.seqs_per_replica(model)
        if per_replica is None:
            return None
        running = replicas(model) if replicas is not None else None
        return per_replica * max(1, running or 0)

    return capacity


class GatewayRuntime:
    """Everything one gateway process holds. Created with `await GatewayRuntime.create(...)`."""

    def __init__(self, config: AppConfig, store: Store, engines: Mapping[str, Engine], cards: Mapping[str, ModelCard],
                 clock: Clock, admin_token: str | None, outbox_spool: Path | None = None,
                 replicas: Replicas | None = None, address: str | None = None) -> None:
        self.config = config
        self.store = store
        self.admin_token = admin_token
        self.clock = clock
        prices = {cid: _price_of(config, card) for cid, card in cards.items()}
        self.controller = AdmissionController(store, config.admission, prices, clock=clock,
                                              outbox=SettleOutbox(store, outbox_spool))
        self.accounts = Accounts(store)
        self.metrics = Metrics()
        self.recent = RecentWindow(lambda: clock() or time.time_ns() // 1_000_000, store.observations, config.console)
        self.heartbeat = Heartbeat(store.observations, config.console, lambda: self.controller.active, clock, address)
        self.replicas = replicas
        # Set by build_gateway_app: which models serve without a cold start (Ray Serve's view under `serve`).
        self.warm_flags: Callable[[], dict[str, bool]] | None = None
        self.scheduler = Scheduler(store, config.scheduler, config.admission, model_capacity(config, replicas), clock)
        self.service = GatewayService(self.controller, self.accounts, engines, cards, self.metrics,
                                      cold_start_timeout=config.cold_start_timeout, scheduler=self.scheduler,
                                      recent=self.recent)
        self.metrics.bind(lambda: self.controller.queue.depth, lambda: self.controller.active,
                          lambda: len(self.controller.outbox), lambda: self.service.cold_starts.waiting)
        self.admin = AdminOps(store, self.accounts, self.controller.policy.unit)
        self.alerts = build_alerts(config, store, clock)
        if self.alerts is not None:
            self.controller.observer = self.alerts.monitor.observe
        self.service.auth_guard = AuthFailureGuard(store, config.gateway.auth_failures_per_minute, clock=clock)

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.controller.active, "queue_depth": self.controller.queue.depth,
                "queued_total": self.controller.queue.waited_total,
                "settlements_pending": len(self.controller.outbox), "models": sorted(self.service.cards),
                "cold_starts_waiting": self.service.cold_starts.waiting}

    def scheduled_models(self) -> list[str]:
        """The models with a capacity queue (LoRA adapters share their base model's)."""
        queues = {self.config.queue_model(cid) for cid, card in self.service.cards.items() if card.kind != "embeddings"}
        return sorted(m for m in queues if self.scheduler.terms(m) is not None)

    async def capacity_stats(self) -> list[CapacityStats]:
        stats = await self.scheduler.stats(self.scheduled_models())
        for s in stats:
            self.metrics.model_capacity.labels(s.model).set(s.capacity)
            self.metrics.model_in_flight.labels(s.model).set(s.in_flight)
            self.metrics.model_waiting.labels(s.model).set(s.waiting)
        return stats

    async def full_stats(self) -> dict[str, Any]:
        """`stats()` plus each scheduled model's capacity, in flight, waiting and top accounts by counter."""
        out = self.stats()
        out["scheduler"] = self.config.scheduler.mode.value
        out["capacity_waiting_here"] = sum(self.scheduler.load.waiting.values())
        out["overloaded_here"] = self.scheduler.load.overloaded
        out["capacity"] = [{
            "model": s.model, "capacity": s.capacity, "in_flight": s.in_flight, "waiting": s.waiting,
            # Counters in policies.fairness units; weighted_tokens_per_weight is the same divided back.
            "top_accounts": [{"account_id": a.account_id, "counter": a.counter,
                              "weighted_tokens_per_weight": a.counter // WEIGHT_SCALE, "running": a.running,
                              "waiting": a.waiting} for a in s.accounts[:TOP_ACCOUNTS]],
        } for s in await self.capacity_stats()]
        out["model_states"] = self.model_states()
        out["recent"] = {"window_s": self.recent.window_ms // 1000, "models": await self.recent.model_summary()}
        out["store"] = await self.store_health()
        out["gateway_id"] = self.heartbeat.gateway_id
        live = await self.store.observations.gateways(self.clock())
        out["gateways"] = {"count": len(live), "data": [b.to_json() for b in live]}
        return out

    def model_states(self) -> list[dict[str, Any]]:
        """Each model: warm (serves now), starting (cold, requests wait for it) or cold; its replicas if known."""
        flags = self.warm_flags() if self.warm_flags is not None else self.service.cold_starts.warm_flags()
        out = []
        for cid, card in sorted(self.service.cards.items()):
            warm = flags.get(cid, True)
            state = "warm" if warm else "starting" if self.service.cold_starts.starting[cid] > 0 else "cold"
            out.append({"model": cid, "kind": card.kind, "state": state,
                        "replicas": self.replicas(cid) if self.replicas is not None else None,
                        "queue_model": self.config.queue_model(cid)})
        return out

    async def store_health(self) -> dict[str, Any]:
        """One store round trip: whether the store answers and how long it took."""
        started = time.monotonic()
        try:
            await self.store.now_ms()
        except StoreError as exc:
            return {"ok": False, "error": str(exc), "kind": self.store_kind()}
        return {"ok": True, "latency_ms": round((time.monotonic() - started) * 1000, 1), "kind": self.store_kind()}

    def store_kind(self) -> str:
        return "redis" if self.config.store.redis_url else "embedded"

    async def account_loads(self) -> dict[str, list[dict[str, Any]]]:
        """Per account, each scheduled model it is active on: counter, running, waiting and its share of the
        model's running sequences (0..1)."""
        out: dict[str, list[dict[str, Any]]] = {}
        for s in await self.capacity_stats():
            for a in s.accounts:
                out.setdefault(a.account_id, []).append({
                    "model": s.model, "counter": a.counter, "weighted_tokens_per_weight": a.counter // WEIGHT_SCALE,
                    "running": a.running, "waiting": a.waiting,
                    "share": round(a.running / s.in_flight, 4) if s.in_flight else 0})
        return out

    async def close(self) -> None:
        await self.heartbeat.stop()
        await self.recent.close()
        await self.scheduler.drain()
        await self.controller.drain()
        if self.alerts is not None:
            await self.alerts.close()
        await self.store.close()


def build_alerts(config: AppConfig, store: Store, clock: Clock) -> Alerts | None:
    """Usage alerts when `alerts.webhook_url` is set; the secret may come from PACKSERVE_ALERT_SECRET."""
    settings = config.alerts
    if not settings.enabled:
        return None
    secret = os.environ.get("PACKSERVE_ALERT_SECRET") or settings.secret
    if not secret:
        raise ValueError("alerts.webhook_url is set but there is no signing secret: set alerts.secret or "
                         "PACKSERVE_ALERT_SECRET")

    def now_ms() -> int:
        return clock() or time.time_ns() // 1_000_000

    return Alerts(store, settings, secret, now_ms)


def _price_of(config: AppConfig, card: ModelCard) -> ModelPrice:
    """A config entry for the model wins (weight overrides); else the engine's card prices it."""
    for m in config.models:
        if m.id == card.id:
            return m.price()
    return ModelPrice(card.input_price_micro, card.output_price_micro, SizeClass(card.size_class))


def build_gateway_app(rt: GatewayRuntime, warm: Callable[[], dict[str, bool]] | None = None) -> FastAPI:
    max_body = rt.config.gateway.max_body_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        rt.controller.start()
        if rt.alerts is not None:
            rt.alerts.start()
        retention = asyncio.get_running_loop().create_task(
            purge_forever(rt.store, rt.config.admission.retention_ms, rt.clock))
        heartbeat = asyncio.get_running_loop().create_task(rt.heartbeat.run_forever())
        if rt.admin_token is None:
            log.warning("admin API disabled: PACKSERVE_ADMIN_TOKEN is not set")
        yield
        retention.cancel()
        heartbeat.cancel()
        await rt.close()

    app = FastAPI(title="packserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    service = rt.service

    def warm_flags() -> dict[str, bool]:
        # Per request: a model's replicas come and go (scale to zero), so a
        # snapshot taken when the app was built would soon be wrong.
        return warm() if warm else service.cold_starts.warm_flags()

    rt.warm_flags = warm_flags
    openai_router = build_openai_router(service, max_body, warm_flags)
    anthropic_router = build_anthropic_router(service, max_body)
    responses_router = build_responses_router(service, max_body)
    for prefix in ("/openai/v1", "/v1"):
        app.include_router(openai_router, prefix=prefix)
        app.include_router(responses_router, prefix=prefix)
    # "/anthropic" too: AI-SDK clients (opencode) append "/messages" to the base URL they are given.
    for prefix in ("/anthropic/v1", "/anthropic", "/v1"):
        app.include_router(anthropic_router, prefix=prefix)
    app.include_router(build_admin_router(rt.admin, rt.admin_token, max_body, rt.full_stats, service.cold_starts.start,
                                       rt.account_loads,
                                       lambda: plans_body(rt.store.plans, rt.config.admission.weight_policy)))

    @app.api_route("/anthropic", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/anthropic/v1", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/openai/v1", methods=["GET", "HEAD"], include_in_schema=False)
    @app.api_route("/v1", methods=["GET", "HEAD"], include_in_schema=False)
    async def base_url(request: Request) -> Response:
        """The base URLs answer, unauthenticated: Claude Code opens each run with `HEAD /anthropic`
        (a reachability check) and a person pasting the base URL into a browser sees what it is."""
        return JSONResponse({"service": "packserve", "base_url": request.url.path,
                             "endpoints": ["GET /v1/models", "POST /v1/chat/completions", "POST /v1/responses",
                                           "POST /v1/messages"]})

    @app.get("/v2/quotas")
    async def quotas(request: Request) -> Response:
        """Free: never charged, never takes a slot."""
        principal = await service.authenticate(request)
        try:
            snap = await rt.controller.snapshot(principal.account.id)
        except NotFound:
            raise invalid_api_key() from None
        return JSONResponse(quotas_body(snap, service.unit))

    @app.get("/v2/usage")
    async def usage(request: Request, days: int = 14) -> Response:
        """The caller's own usage per model and day (the customer dashboard reads this)."""
        principal = await service.authenticate(request)
        if not 1 <= days <= 90:
            raise ApiError(400, "'days' must be from 1 to 90", "invalid_request", "days")
        return JSONResponse(await rt.admin.usage(principal.account.id, days))

    @app.get("/health")
    async def health() -> Response:
        """Answers at once: never waits on the store or a cold model."""
        return JSONResponse({"status": "ok", "models": len(service.cards),
                             "settlements_pending": len(rt.controller.outbox)})

    @app.get("/metrics")
    async def metrics() -> Response:
        try:
            await rt.capacity_stats()
        except StoreError as exc:
            # The rest of the metrics still answer; the capacity gauges keep their last values.
            log.warning("capacity stats unavailable for /metrics", extra={"error": str(exc)})
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v2/keys")
    async def keys(request: Request) -> Response:
        """The caller's account's keys with their limits (prefixes only, never a secret)."""
        principal = await service.authenticate(request)
        listed = await rt.store.list_keys(principal.account.id)
        return JSONResponse({"data": [{**k.to_json(), "current": k.id == principal.key.id}
                                      for k in listed if not k.revoked]})

    @app.get("/v2/refusals")
    async def refusals(request: Request) -> Response:
        """The caller's account's refusals (429/403/503) on every gateway within the retention, newest first."""
        principal = await service.authenticate(request)
        return JSONResponse({"window_s": rt.recent.bounds.retention_ms // 1000,
                             "data": await rt.recent.account_refusals(principal.account.id)})

    @app.get("/dashboard")
    async def dashboard() -> Response:
        html = (STATIC / "console.html").read_text()
        return HTMLResponse(html, headers=page_headers(html))

    @app.get("/favicon.ico")
    async def favicon() -> Response:
        return Response((STATIC / "favicon.ico").read_bytes(), media_type="image/x-icon",
                        headers={"cache-control": "public, max-age=86400"})

    @app.get("/static/{name}")
    async def static_file(name: str) -> Response:
        """The console's own files: a fixed list, so no path reaches outside the directory."""
        media = STATIC_FILES.get(name)
        if media is None:
            raise ApiError(404, f"no static file '{name}'", "not_found")
        return Response((STATIC / name).read_bytes(), media_type=media, headers={"cache-control": "no-cache"})

    def rejected(request: Request, exc: ApiError) -> Response:
        """Every error answer is counted by route and code and logged (never the body), so an
        operator sees a client that cannot get in, not only the generations that finished."""
        route = _route_label(request)
        code = exc.code or _status_code_name(exc.status)
        rt.metrics.errors.labels(route, str(exc.status), code).inc()
        log.log(logging.ERROR if exc.status >= 500 else logging.WARNING, "request rejected", extra={
            "method": request.method, "path": request.url.path, "route": route, "status": exc.status,
            "code": code, "account": getattr(request.state, "account_id", None)})
        return error_response(request, exc)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        return rejected(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return rejected(request, ApiError(400, f"Invalid value for '{where}': {first.get('msg', 'invalid')}",
                                          "invalid_request", where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if request.url.path == "/admin" or request.url.path.startswith("/admin/"):
            # Any admin path (unknown, wrong method) without the token is 401: probing learns nothing.
            try:
                check_admin_token(request, rt.admin_token)
            except ApiError as refused:
                return rejected(request, refused)
        message = "Not found: see GET /v1/models, POST /v1/chat/completions, POST /v1/responses, " \
            "POST /v1/messages." \
            if exc.status_code == 404 else str(exc.detail)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return rejected(request, ApiError(exc.status_code, message, code))

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> Response:
        # The catalog knows the id (routes resolve it first) but the engine it reached does not serve it.
        log.warning("model not served by its engine", extra={"model": exc.model})
        return rejected(request, not_served(exc))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> Response:
        log.error("store unavailable", extra={"error": str(exc)})
        return rejected(request, store_unavailable())

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return rejected(request, ApiError(500, "internal error; it has been logged", "internal_error"))

    return app


def _route_label(request: Request) -> str:
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


def _status_code_name(status: int) -> str:
    return {400: "invalid_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
            405: "method_not_allowed", 413: "request_too_large", 429: "rate_limited"}.get(status, f"http_{status}")


async def create_runtime(config: AppConfig, engines: Mapping[str, Engine], cards: Mapping[str, ModelCard], *,
                         clock: Clock = store_clock, admin_token: str | None = None,
                         store: Store | None = None, replicas: Replicas | None = None,
                         address: str | None = None) -> GatewayRuntime:
    data_dir = config.store.data_dir or default_data_dir()
    if store is None:
        store = await open_store(request_unit=config.admission.weight_policy.unit,
                                 redis_url=config.store.redis_url, data_dir=data_dir,
                                 plans=config.plans.catalog())
    spool = data_dir / "settlements.pending"
    data_dir.mkdir(parents=True, exist_ok=True)
    return GatewayRuntime(config, store, engines, cards, clock, admin_token, spool, replicas, address)
