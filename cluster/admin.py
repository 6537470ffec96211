"""Operator operations, returning the JSON bodies of the admin API.

The admin HTTP API and the `packserve` CLI (local mode) both call these, so
the CLI against a data directory and the CLI against `--server URL` print
the same things.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cluster.accounts import Accounts
from cluster.quotas import quotas_body, usage_by_model_day
from cluster.records import Account
from cluster.store import Store
from policies.units import DAY_MS, format_dollars_pico

Json = dict[str, Any]
ACCOUNT_SORTS = ("name", "id", "created", "plan", "packs", "suspended")
MAX_PAGE = 500


def _sort_key(account: Account, sort: str) -> str | int:
    if sort == "created":
        return account.created_ms
    if sort == "plan":
        return account.plan.value
    if sort == "packs":
        return ",".join(account.packs)
    if sort == "suspended":
        return int(account.suspended)
    return account.id if sort == "id" else account.name.lower()


class AdminOps:
    def __init__(self, store: Store, accounts: Accounts, request_unit: int) -> None:
        self.store = store
        self.accounts = accounts
        self.unit = request_unit

    async def create_account(self, name: str, plan: str, packs: Sequence[str] | None,
                             spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Json:
        account = await self.accounts.create(name, plan, packs, spend_cap_usd, concurrency)
        return account.to_json()

    async def list_accounts(self) -> list[Json]:
        return [a.to_json() for a in await self.store.list_accounts()]

    async def account_page(self, search: str = "", sort: str = "name", descending: bool = False,
                           offset: int = 0, limit: int = 50) -> Json:
        """One page of accounts, filtered and sorted, each with its keys count and both bars.

        Filtering and sorting read only the account records, so a few thousand
        accounts cost one listing; bars are read for the page's rows only.
        """
        if sort not in ACCOUNT_SORTS:
            raise ValueError(f"'sort' must be one of {', '.join(ACCOUNT_SORTS)}")
        if offset < 0 or not 1 <= limit <= MAX_PAGE:
            raise ValueError(f"'offset' must be 0 or more and 'limit' from 1 to {MAX_PAGE}")
        needle = search.strip().lower()
        accounts = [a for a in await self.store.list_accounts()
                    if not needle or needle in a.name.lower() or needle in a.id.lower()
                    or any(needle in p.lower() for p in a.packs)]
        accounts.sort(key=lambda a: (_sort_key(a, sort), a.id), reverse=descending)
        rows = []
        for account in accounts[offset:offset + limit]:
            row = account.to_json()
            row["quotas"] = quotas_body(await self.store.snapshot(account.id), self.unit)
            rows.append(row)
        return {"data": rows, "total": len(accounts), "offset": offset, "limit": limit, "sort": sort,
                "order": "desc" if descending else "asc"}

    async def show_account(self, account_id: str) -> Json:
        account = await self.accounts.get(account_id)
        body = account.to_json()
        body["keys"] = [k.to_json() for k in await self.store.list_keys(account_id)]
        body["quotas"] = quotas_body(await self.store.snapshot(account_id), self.unit)
        return body

    async def set_plan(self, account_id: str, plan: str, packs: Sequence[str] | None,
                       spend_cap_usd: float | str | None = None, concurrency: int | None = None) -> Json:
        return (await self.accounts.set_plan(account_id, plan, packs, spend_cap_usd, concurrency)).to_json()

    async def suspend(self, account_id: str, suspended: bool) -> Json:
        return (await self.accounts.set_suspended(account_id, suspended)).to_json()

    async def delete_account(self, account_id: str) -> None:
        await self.accounts.delete(account_id)

    async def create_key(self, account_id: str, limits: Json | None = None) -> Json:
        created = await self.accounts.create_key(account_id, limits)
        return {**created.key.to_json(), "key": created.secret}

    async def update_key(self, account_id: str, key_id: str, limits: Json) -> Json:
        return (await self.accounts.update_key(account_id, key_id, limits)).to_json()

    async def list_keys(self, account_id: str, prefix: str | None = None) -> list[Json]:
        await self.accounts.get(account_id)
        keys = await self.store.list_keys(account_id)
        return [k.to_json() for k in keys if prefix is None or k.prefix.startswith(prefix)]

    async def revoke_key(self, key_id: str) -> None:
        await self.accounts.revoke_key(key_id)

    async def usage(self, account_id: str, days: int = 14, now_ms: int | None = None) -> Json:
        await self.accounts.get(account_id)
        now = await self.store.now_ms() if now_ms is None else now_ms
        since = now - days * DAY_MS
        events = await self.store.usage(account_id, since)
        rows = usage_by_model_day(events)
        total_cost = sum(int(r["cost_pico"]) for r in rows)
        return {
            "account_id": account_id,
            "since_ms": since,
            "rows": rows,
            "totals": {
                "requests": sum(int(r["requests"]) for r in rows),
                "prompt_tokens": sum(int(r["prompt_tokens"]) for r in rows),
                "cached_tokens": sum(int(r["cached_tokens"]) for r in rows),
                "completion_tokens": sum(int(r["completion_tokens"]) for r in rows),
                "cost_usd": format_dollars_pico(total_cost),
                "cost_pico": total_cost,
            },
        }

    async def export_usage(self, account_id: str, since_ms: int = 0) -> list[Json]:
        """Every retained event of an account, one JSON object each (metadata only)."""
        await self.accounts.get(account_id)
        return [
            {"ts_ms": e.ts_ms, "key_id": e.key_id, "model": e.model, "prompt_tokens": e.prompt_tokens,
             "cached_tokens": e.cached_tokens, "completion_tokens": e.completion_tokens,
             "weight": e.weight_units / self.unit, "cost_pico": e.cost_pico, "status": e.status,
             "ttft_ms": e.ttft_ms, "duration_ms": e.duration_ms, "api": e.api}
            for e in await self.store.usage(account_id, since_ms)
        ]

    async def quota(self, account_id: str) -> Json:
        return quotas_body(await self.store.snapshot(account_id), self.unit)
