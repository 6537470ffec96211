"""The CLI's `--server URL` mode: the same operations as `cluster.admin.AdminOps`, over the admin API."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx

from cluster.store import NotFound
from policies.plans import PlanError

Json = dict[str, Any]


class AdminApiError(Exception):
    pass


class AdminClient:
    def __init__(self, base_url: str, token: str | None, timeout_s: float = 30) -> None:
        if not token:
            raise AdminApiError("--server needs PACKSERVE_ADMIN_TOKEN set to the gateway's operator token")
        self._http = httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s,
                                       headers={"authorization": f"Bearer {token}"})

    async def close(self) -> None:
        await self._http.aclose()

    async def _call(self, method: str, path: str, body: Json | None = None,
                    params: dict[str, Any] | None = None) -> Any:
        try:
            r = await self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise AdminApiError(f"cannot reach {self._http.base_url}: {exc}") from None
        if r.status_code == 204:
            return None
        try:
            data = r.json()
        except json.JSONDecodeError:
            raise AdminApiError(f"{method} {path}: HTTP {r.status_code} with a non-JSON body") from None
        if r.status_code >= 400:
            message = data.get("error", {}).get("message", r.text) if isinstance(data, dict) else r.text
            if r.status_code == 404:
                raise NotFound(message)
            if r.status_code == 400:
                raise PlanError(message)
            raise AdminApiError(f"HTTP {r.status_code}: {message}")
        return data

    @staticmethod
    def _plan_body(plan: str, packs: Sequence[str] | None, spend_cap_usd: float | str | None,
                   concurrency: int | None) -> Json:
        body: Json = {"plan": plan}
        if packs is not None:
            body["packs"] = list(packs)
        if spend_cap_usd is not None:
            body["spend_cap_usd"] = str(spend_cap_usd)
        if concurrency is not None:
            body["concurrency"] = concurrency
        return body

    async def create_account(self, name: str, plan: str, packs: Sequence[str] | None,
                             spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Json:
        body = {"name": name, **self._plan_body(plan, packs, spend_cap_usd, concurrency)}
        return dict(await self._call("POST", "/admin/v1/accounts", body))

    async def list_accounts(self) -> list[Json]:
        return list((await self._call("GET", "/admin/v1/accounts"))["data"])

    async def show_account(self, account_id: str) -> Json:
        return dict(await self._call("GET", f"/admin/v1/accounts/{account_id}"))

    async def set_plan(self, account_id: str, plan: str, packs: Sequence[str] | None,
                       spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Json:
        body = self._plan_body(plan, packs, spend_cap_usd, concurrency)
        return dict(await self._call("PUT", f"/admin/v1/accounts/{account_id}/packs", body))

    async def suspend(self, account_id: str, suspended: bool) -> Json:
        action = "suspend" if suspended else "resume"
        return dict(await self._call("POST", f"/admin/v1/accounts/{account_id}/{action}"))

    async def delete_account(self, account_id: str) -> None:
        await self._call("DELETE", f"/admin/v1/accounts/{account_id}")

    async def create_key(self, account_id: str, limits: Json | None = None) -> Json:
        return dict(await self._call("POST", f"/admin/v1/accounts/{account_id}/keys", limits or None))

    async def update_key(self, account_id: str, key_id: str, limits: Json) -> Json:
        return dict(await self._call("PATCH", f"/admin/v1/accounts/{account_id}/keys/{key_id}", limits))

    async def list_keys(self, account_id: str, prefix: str | None = None) -> list[Json]:
        params = {"prefix": prefix} if prefix else None
        return list((await self._call("GET", f"/admin/v1/accounts/{account_id}/keys", params=params))["data"])

    async def revoke_key(self, key_id: str) -> None:
        await self._call("DELETE", f"/admin/v1/keys/{key_id}")

    async def usage(self, account_id: str, days: int = 14) -> Json:
        return dict(await self._call("GET", f"/admin/v1/accounts/{account_id}/usage", params={"days": days}))

    async def quota(self, account_id: str) -> Json:
        return dict(await self._call("GET", f"/admin/v1/accounts/{account_id}/quota"))
