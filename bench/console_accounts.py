"""The operator console's account table with thousands of accounts: one page request, both stores.

For 1,000 and 3,000 accounts (each with one standard pack), times
AdminOps.account_page (what `GET /admin/v1/accounts?limit=25` runs: list,
filter, sort, then both bars of the 25 rows) for the first page, a search and
a reverse sort, on the embedded store and on a redis-server this script starts.

Rerun:  .venv/bin/python bench/console_accounts.py [--sizes 1000,3000] [--repeat 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit_json, machine, percentile, print_table, redis_server
from cluster.accounts import Accounts
from cluster.admin import AdminOps
from cluster.open_store import open_store
from cluster.settings import AdmissionSettings
from cluster.store import Store

QUERIES: dict[str, dict[str, Any]] = {
    "first page": {},
    "search": {"search": "team 0012"},
    "sort desc": {"sort": "created", "descending": True},
}


async def measure(store: Store, sizes: list[int], repeat: int, label: str) -> list[dict[str, Any]]:
    unit = AdmissionSettings().weight_policy.unit
    accounts = Accounts(store)
    ops = AdminOps(store, accounts, unit)
    rows: list[dict[str, Any]] = []
    made = 0
    for size in sizes:
        while made < size:
            await accounts.create(f"team {made:05d}", "subscription", ["standard"])
            made += 1
        for name, query in QUERIES.items():
            times = []
            for _ in range(repeat):
                started = time.perf_counter()
                page = await ops.account_page(limit=25, **query)
                times.append((time.perf_counter() - started) * 1000)
            rows.append({"store": label, "accounts": size, "query": name, "rows": len(page["data"]),
                         "p50_ms": round(percentile(times, 50), 1), "max_ms": round(max(times), 1)})
    await store.close()
    return rows


async def run(sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    unit = AdmissionSettings().weight_policy.unit
    with tempfile.TemporaryDirectory() as tmp:
        rows = await measure(await open_store(request_unit=unit, data_dir=Path(tmp)), sizes, repeat, "embedded")
    with redis_server() as url:
        rows += await measure(await open_store(request_unit=unit, redis_url=url, data_dir=Path(tempfile.mkdtemp())),
                              sizes, repeat, "redis")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,3000")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = asyncio.run(run([int(s) for s in args.sizes.split(",")], args.repeat))
    if args.json:
        emit_json({"machine": machine(), "rows": rows})
        return
    print(machine())
    print_table("GET /admin/v1/accounts?limit=25 (AdminOps.account_page)", rows,
                ["store", "accounts", "query", "rows", "p50_ms", "max_ms"])


if __name__ == "__main__":
    main()
