"""The operator API under /admin/v1, guarded by PACKSERVE_ADMIN_TOKEN.

With no token configured the whole API answers 404 "admin API disabled"
(and start-up says so), so an unconfigured gateway never exposes it.
"""

from __future__ import annotations

import hmac
import inspect
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cluster.admin import AdminOps
from cluster.store import NotFound
from policies.plans import PlanError
from serve_apps.gateway.body import read_json
from serve_apps.gateway.errors import ApiError, model_not_found


def _str_list(body: dict[str, Any], field: str) -> list[str] | None:
    value = body.get(field)
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ApiError(400, f"'{field}' must be a list of strings such as [\"standard\"]", "invalid_request", field)
    return value


def _int_or_none(body: dict[str, Any], field: str) -> int | None:
    value = body.get(field)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ApiError(400, f"'{field}' must be an integer", "invalid_request", field)
    return value


def _cap(body: dict[str, Any]) -> str | None:
    value = body.get("spend_cap_usd")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ApiError(400, "'spend_cap_usd' must be a number of dollars", "invalid_request", "spend_cap_usd")
    return str(value)


KEY_LIMIT_FIELDS = ("models", "expires", "max_requests", "max_weekly_usd", "disabled")


def _key_limits(body: dict[str, Any], allow_clear: bool = False) -> dict[str, Any]:
    """A key-limits body checked for shape; cluster.key_limits validates the values."""
    allowed = (*KEY_LIMIT_FIELDS, "clear") if allow_clear else KEY_LIMIT_FIELDS
    unknown = sorted(set(body) - set(allowed))
    if unknown:
        raise ApiError(400, f"unknown field '{unknown[0]}' (allowed: {', '.join(allowed)})", "invalid_request",
                       unknown[0])
    out = {k: v for k, v in body.items() if v is not None}
    for field in ("models", "clear"):
        if field in out:
            out[field] = _str_list(out, field)
    if "disabled" in out and not isinstance(out["disabled"], bool):
        raise ApiError(400, "'disabled' must be true or false", "invalid_request", "disabled")
    if "max_requests" in out:
        _int_or_none(out, "max_requests")
    if "expires" in out and (isinstance(out["expires"], bool) or not isinstance(out["expires"], int | str)):
        raise ApiError(400, "'expires' must be an ISO 8601 time or epoch milliseconds", "invalid_request", "expires")
    if "max_weekly_usd" in out and (isinstance(out["max_weekly_usd"], bool)
                                    or not isinstance(out["max_weekly_usd"], int | float | str)):
        raise ApiError(400, "'max_weekly_usd' must be a number of dollars", "invalid_request", "max_weekly_usd")
    return out


def check_admin_token(request: Request, token: str | None) -> None:
    """Constant-time check of the operator token (a 404 when the admin API is disabled)."""
    if token is None:
        raise ApiError(404, "the admin API is disabled: set PACKSERVE_ADMIN_TOKEN to enable it", "admin_disabled")
    auth = request.headers.get("authorization", "")
    scheme, _, presented = auth.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), token.encode()):
        raise ApiError(401, "admin API: send 'Authorization: Bearer <PACKSERVE_ADMIN_TOKEN>'",
                       "invalid_admin_token")


def build_admin_router(ops: AdminOps, token: str | None, max_body_bytes: int,
                       stats: Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]],
                       start_model: Callable[[str], Awaitable[bool | None]] | None = None,
                       loads: Callable[[], Awaitable[dict[str, list[dict[str, Any]]]]] | None = None,
                       plans: Callable[[], dict[str, Any]] | None = None) -> APIRouter:
    async def require_token(request: Request) -> None:
        # A router dependency runs before FastAPI validates path and query parameters, so a
        # caller without the token learns nothing from a 400 about a parameter.
        check_admin_token(request, token)

    router = APIRouter(prefix="/admin/v1", dependencies=[Depends(require_token)])

    def guard(request: Request) -> None:
        check_admin_token(request, token)

    async def call(coro: Any) -> Any:
        try:
            return await coro
        except NotFound as exc:
            raise ApiError(404, str(exc), "not_found") from None
        except (PlanError, ValueError) as exc:
            raise ApiError(400, str(exc), "invalid_request") from None

    @router.post("/accounts")
    async def create_account(request: Request) -> Response:
        guard(request)
        body = await read_json(request, max_body_bytes)
        name = body.get("name")
        if not isinstance(name, str):
            raise ApiError(400, "'name' is required and must be a string", "invalid_request", "name")
        plan = body.get("plan", "subscription")
        if not isinstance(plan, str):
            raise ApiError(400, "'plan' must be 'subscription' or 'payg'", "invalid_request", "plan")
        out = await call(ops.create_account(name, plan, _str_list(body, "packs"), _cap(body),
                                            _int_or_none(body, "concurrency")))
        return JSONResponse(out, status_code=201)

    @router.get("/accounts")
    async def list_accounts(request: Request, q: str | None = None, sort: str | None = None,
                            order: str | None = None, offset: int | None = None, limit: int | None = None) -> Response:
        """Every account; with any of q/sort/order/offset/limit, one page of them with both bars and the
        scheduler's view of each (docs/console.md)."""
        guard(request)
        if q is None and sort is None and order is None and offset is None and limit is None:
            return JSONResponse({"data": await call(ops.list_accounts())})
        if order not in (None, "asc", "desc"):
            raise ApiError(400, "'order' must be 'asc' or 'desc'", "invalid_request", "order")
        page = await call(ops.account_page(q or "", sort or "name", order == "desc", offset or 0,
                                           50 if limit is None else limit))
        if loads is not None:
            by_account = await loads()
            for row in page["data"]:
                row["scheduler"] = by_account.get(row["id"], [])
        return JSONResponse(page)

    @router.get("/accounts/{account_id}")
    async def show_account(request: Request, account_id: str) -> Response:
        guard(request)
        return JSONResponse(await call(ops.show_account(account_id)))

    @router.put("/accounts/{account_id}/packs")
    async def set_packs(request: Request, account_id: str) -> Response:
        guard(request)
        body = await read_json(request, max_body_bytes)
        plan = body.get("plan", "subscription")
        if not isinstance(plan, str):
            raise ApiError(400, "'plan' must be 'subscription' or 'payg'", "invalid_request", "plan")
        packs = _str_list(body, "packs")
        if plan == "subscription" and packs is None:
            raise ApiError(400, "'packs' is required, e.g. {\"packs\": [\"standard\"]}", "invalid_request", "packs")
        return JSONResponse(await call(ops.set_plan(account_id, plan, packs, _cap(body),
                                                    _int_or_none(body, "concurrency"))))

    @router.post("/accounts/{account_id}/suspend")
    async def suspend(request: Request, account_id: str) -> Response:
        guard(request)
        return JSONResponse(await call(ops.suspend(account_id, True)))

    @router.post("/accounts/{account_id}/resume")
    async def resume(request: Request, account_id: str) -> Response:
        guard(request)
        return JSONResponse(await call(ops.suspend(account_id, False)))

    @router.delete("/accounts/{account_id}")
    async def delete_account(request: Request, account_id: str) -> Response:
        guard(request)
        await call(ops.delete_account(account_id))
        return Response(status_code=204)

    @router.post("/accounts/{account_id}/keys")
    async def create_key(request: Request, account_id: str) -> Response:
        guard(request)
        # The body is optional: {models, expires, max_requests, max_weekly_usd, disabled}.
        has_body = request.headers.get("content-length", "0") != "0" or "transfer-encoding" in request.headers
        limits = _key_limits(await read_json(request, max_body_bytes)) if has_body else None
        return JSONResponse(await call(ops.create_key(account_id, limits)), status_code=201)

    @router.patch("/accounts/{account_id}/keys/{key_id}")
    async def update_key(request: Request, account_id: str, key_id: str) -> Response:
        guard(request)
        body = await read_json(request, max_body_bytes)
        return JSONResponse(await call(ops.update_key(account_id, key_id, _key_limits(body, allow_clear=True))))

    @router.get("/accounts/{account_id}/keys")
    async def list_keys(request: Request, account_id: str, prefix: str | None = None) -> Response:
        guard(request)
        return JSONResponse({"data": await call(ops.list_keys(account_id, prefix))})

    @router.delete("/keys/{key_id}")
    async def revoke_key(request: Request, key_id: str) -> Response:
        guard(request)
        await call(ops.revoke_key(key_id))
        return Response(status_code=204)

    @router.get("/accounts/{account_id}/usage")
    async def usage(request: Request, account_id: str, days: int = 14) -> Response:
        guard(request)
        if not 1 <= days <= 3650:
            raise ApiError(400, "'days' must be from 1 to 3650", "invalid_request", "days")
        return JSONResponse(await call(ops.usage(account_id, days)))

    @router.get("/accounts/{account_id}/usage/export")
    async def export(request: Request, account_id: str, since_ms: int = 0) -> Response:
        guard(request)
        rows = await call(ops.export_usage(account_id, since_ms))

        async def lines() -> AsyncIterator[str]:
            for row in rows:
                yield json.dumps(row) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    @router.get("/accounts/{account_id}/quota")
    async def quota(request: Request, account_id: str) -> Response:
        guard(request)
        return JSONResponse(await call(ops.quota(account_id)))

    @router.get("/stats")
    async def gateway_stats(request: Request) -> Response:
        """This gateway's load (in-flight requests, queue depth, settlements pending) and each model's capacity."""
        guard(request)
        result = stats()
        return JSONResponse(await result if inspect.isawaitable(result) else result)

    if plans is not None:
        listing = plans

        @router.get("/plans")
        async def list_plans(request: Request) -> Response:
            """The configured pack kinds (prices, bar sizes, concurrency) and both bars' schedules."""
            guard(request)
            return JSONResponse(listing())

    if start_model is not None:
        starter = start_model

        @router.post("/models/{model_id:path}/warm")
        async def warm_model(request: Request, model_id: str) -> Response:
            """Start a replica ahead of traffic: 202 while it starts, 200 if it was warm already."""
            guard(request)
            warm = await starter(model_id)
            if warm is None:
                raise model_not_found(model_id)
            return JSONResponse({"model": model_id, "warm": warm, "status": "warm" if warm else "starting"},
                                status_code=200 if warm else 202)

    return router
