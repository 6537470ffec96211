"""The gateway application: one FastAPI app serving both APIs, quotas, health, metrics, admin.

Built by `build_gateway_app` from a `GatewayRuntime` (settings, store,
controller, engines), so the same code runs under plain uvicorn
(`packserve gateway`) and as the Ray Serve ingress (`packserve serve`).
"""

from __future__ import annotations

import logging
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
from cluster.controller import AdmissionController, Clock, store_clock
from cluster.open_store import open_store
from cluster.outbox import SettleOutbox
from cluster.quotas import quotas_body
from cluster.settings import default_data_dir
from cluster.store import NotFound, Store, StoreError
from policies.plans import SizeClass
from policies.pricing import ModelPrice
from serve_apps.config import AppConfig
from serve_apps.engines.types import Engine, ModelCard
from serve_apps.gateway.admin_routes import build_admin_router
from serve_apps.gateway.anthropic_routes import build_anthropic_router
from serve_apps.gateway.errors import ApiError, UnknownModel, error_response, not_served
from serve_apps.gateway.metrics import Metrics
from serve_apps.gateway.openai_routes import build_openai_router
from serve_apps.gateway.service import GatewayService

log = logging.getLogger("packserve.gateway")

STATIC = Path(__file__).resolve().parent.parent / "static"


class GatewayRuntime:
    """Everything one gateway process holds. Created with `await GatewayRuntime.create(...)`."""

    def __init__(self, config: AppConfig, store: Store, engines: Mapping[str, Engine], cards: Mapping[str, ModelCard],
                 clock: Clock, admin_token: str | None, outbox_spool: Path | None = None) -> None:
        self.config = config
        self.store = store
        self.admin_token = admin_token
        prices = {cid: _price_of(config, card) for cid, card in cards.items()}
        self.controller = AdmissionController(store, config.admission, prices, clock=clock,
                                              outbox=SettleOutbox(store, outbox_spool))
        self.accounts = Accounts(store)
        self.metrics = Metrics()
        self.service = GatewayService(self.controller, self.accounts, engines, cards, self.metrics,
                                      cold_start_timeout=config.cold_start_timeout)
        self.metrics.bind(lambda: self.controller.queue.depth, lambda: self.controller.active,
                          lambda: len(self.controller.outbox), lambda: self.service.cold_starts_waiting)
        self.admin = AdminOps(store, self.accounts, self.controller.policy.unit)

    def stats(self) -> dict[str, Any]:
        return {"in_flight": self.controller.active, "queue_depth": self.controller.queue.depth,
                "queued_total": self.controller.queue.waited_total,
                "settlements_pending": len(self.controller.outbox), "models": sorted(self.service.cards),
                "cold_starts_waiting": self.service.cold_starts_waiting}

    async def close(self) -> None:
        await self.controller.drain()
        await self.store.close()


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
        if rt.admin_token is None:
            log.warning("admin API disabled: PACKSERVE_ADMIN_TOKEN is not set")
        yield
        await rt.close()

    app = FastAPI(title="packserve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    service = rt.service

    def warm_flags() -> dict[str, bool]:
        # Per request: a model's replicas come and go (scale to zero), so a
        # snapshot taken when the app was built would soon be wrong.
        return warm() if warm else {cid: service.is_warm(card) for cid, card in service.cards.items()}

    openai_router = build_openai_router(service, max_body, warm_flags)
    anthropic_router = build_anthropic_router(service, max_body)
    for prefix in ("/openai/v1", "/v1"):
        app.include_router(openai_router, prefix=prefix)
    for prefix in ("/anthropic/v1", "/v1"):
        app.include_router(anthropic_router, prefix=prefix)
    app.include_router(build_admin_router(rt.admin, rt.admin_token, max_body, rt.stats, service.start_model))

    @app.get("/v2/quotas")
    async def quotas(request: Request) -> Response:
        """Free: never charged, never takes a slot."""
        principal = await service.authenticate(request)
        try:
            snap = await rt.controller.snapshot(principal.account.id)
        except NotFound:
            raise ApiError(401, "invalid API key", "invalid_api_key") from None
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
        return Response(rt.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/dashboard")
    async def dashboard() -> Response:
        return HTMLResponse((STATIC / "dashboard.html").read_text())

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> Response:
        rt.metrics.errors.labels(str(exc.status), exc.code or "").inc()
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("query", "path", "body"))
        return error_response(request, ApiError(400, f"Invalid value for '{where}': {first.get('msg', 'invalid')}",
                                                "invalid_request", where or None))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        message = "Not found: see GET /v1/models, POST /v1/chat/completions, POST /v1/messages." \
            if exc.status_code == 404 else str(exc.detail)
        return error_response(request, ApiError(exc.status_code, message, "not_found"
                                                if exc.status_code == 404 else None))

    @app.exception_handler(UnknownModel)
    async def unknown_model(request: Request, exc: UnknownModel) -> Response:
        # The catalog knows the id (routes resolve it first) but the engine it reached does not serve it.
        log.warning("model not served by its engine", extra={"model": exc.model})
        return error_response(request, not_served(exc))

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> Response:
        log.error("store unavailable", extra={"error": str(exc)})
        return error_response(request, ApiError(503, "the quota store is unavailable, retry shortly",
                                                "store_unavailable", headers={"retry-after": "5"}))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error", extra={"path": request.url.path})
        return error_response(request, ApiError(500, "internal error; it has been logged", "internal_error"))

    return app


async def create_runtime(config: AppConfig, engines: Mapping[str, Engine], cards: Mapping[str, ModelCard], *,
                         clock: Clock = store_clock, admin_token: str | None = None,
                         store: Store | None = None) -> GatewayRuntime:
    data_dir = config.store.data_dir or default_data_dir()
    if store is None:
        store = await open_store(request_unit=config.admission.weight_policy.unit,
                                 redis_url=config.store.redis_url, data_dir=data_dir)
    spool = data_dir / "settlements.pending"
    data_dir.mkdir(parents=True, exist_ok=True)
    return GatewayRuntime(config, store, engines, cards, clock, admin_token, spool)
