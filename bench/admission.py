"""Admission benchmark: reserve+settle pairs per second and latency, both stores.

For the embedded store (SQLite file in a temp dir) and the Redis store (a
redis-server this script starts on a free port), at 1, 8 and 64 concurrent
callers, each caller on its own account (so concurrency limits never
queue): pairs/s, reserve p50/p99, settle p50/p99, and Redis commands per
pair, beside a bare Redis PING round trip measured in the same run with the
same client library.

Rerun:  .venv/bin/python bench/admission.py [--pairs N] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as aioredis

from bench.common import emit_json, machine, percentile, print_table, redis_server
from cluster.accounts import Accounts
from cluster.controller import AdmissionController
from cluster.embedded_store import EmbeddedStore
from cluster.redis_store import RedisStore
from cluster.settings import AdmissionSettings
from cluster.store import Store
from policies.plans import SizeClass
from policies.pricing import ModelPrice

MODEL = "hf:bench/model"
# A tiny weight so thousands of pairs never empty the request bar mid-run.
PRICES = {MODEL: ModelPrice(1_200_000, 3_400_000, SizeClass.STANDARD, weight_override=Fraction(1, 1000))}
CONCURRENCY = (1, 8, 64)


async def run_pairs(store: Store, callers: int, pairs_per_caller: int) -> dict[str, Any]:
    settings = AdmissionSettings(queue_timeout_s=0, reference_price=Decimal("3.40"))
    accounts = Accounts(store)
    ctl = AdmissionController(store, settings, PRICES)
    accts = [await accounts.create(f"bench-{i}", "subscription", ["founder"] * 5) for i in range(callers)]
    reserve_ms: list[float] = []
    settle_ms: list[float] = []

    async def caller(i: int) -> None:
        account = accts[i]
        for _ in range(pairs_per_caller):
            t0 = time.perf_counter()
            ticket = await ctl.reserve(account, "key_bench", MODEL, queue_timeout_s=0)
            t1 = time.perf_counter()
            await ctl.settle(ticket, prompt_tokens=1000, cached_tokens=500, completion_tokens=100, status="ok",
                             first_token=True, ttft_ms=10)
            t2 = time.perf_counter()
            reserve_ms.append((t1 - t0) * 1000)
            settle_ms.append((t2 - t1) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(callers)))
    elapsed = time.perf_counter() - started
    for a in accts:
        await accounts.delete(a.id)
    total = callers * pairs_per_caller
    return {
        "callers": callers,
        "pairs": total,
        "pairs_per_s": round(total / elapsed, 1),
        "reserve_p50_ms": round(percentile(reserve_ms, 50), 3),
        "reserve_p99_ms": round(percentile(reserve_ms, 99), 3),
        "settle_p50_ms": round(percentile(settle_ms, 50), 3),
        "settle_p99_ms": round(percentile(settle_ms, 99), 3),
    }


async def ping(url: str, callers: int, per_caller: int) -> dict[str, Any]:
    client = aioredis.from_url(url)
    lat: list[float] = []

    async def caller() -> None:
        for _ in range(per_caller):
            t0 = time.perf_counter()
            await client.ping()
            lat.append((time.perf_counter() - t0) * 1000)

    await asyncio.gather(*(caller() for _ in range(callers)))
    await client.aclose()
    return {"ping_p50_ms": round(percentile(lat, 50), 3), "ping_p99_ms": round(percentile(lat, 99), 3)}


async def commands_per_pair(url: str, unit: int) -> float:
    """Redis commands the server executed per reserve+settle pair (round trips on the wire)."""
    store = await RedisStore.connect(url, request_unit=unit)
    client = aioredis.from_url(url)
    ctl = AdmissionController(store, AdmissionSettings(queue_timeout_s=0), PRICES)
    account = await Accounts(store).create("rt", "subscription", ["standard"])
    ticket = await ctl.reserve(account, "k", MODEL, queue_timeout_s=0)  # warm: scripts loaded
    await ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                     first_token=True, ttft_ms=1)
    before = await client.info("stats")
    n = 50
    for _ in range(n):
        ticket = await ctl.reserve(account, "k", MODEL, queue_timeout_s=0)
        await ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                         first_token=True, ttft_ms=1)
    after = await client.info("stats")
    await client.aclose()
    await store.close()
    # total_commands_processed counts our own INFO call too: subtract it.
    return (int(after["total_commands_processed"]) - int(before["total_commands_processed"]) - 1) / n


async def main_async(pairs: int) -> dict[str, Any]:
    unit = AdmissionSettings().weight_policy.unit
    results: dict[str, Any] = {"machine": machine(), "embedded": [], "redis": []}
    with tempfile.TemporaryDirectory() as tmp:
        for callers in CONCURRENCY:
            print(f"  embedded store, {callers} callers ...", file=sys.stderr, flush=True)
            store = EmbeddedStore(Path(tmp) / f"bench-{callers}.db", request_unit=unit)
            results["embedded"].append(await run_pairs(store, callers, max(1, pairs // callers)))
            await store.close()
    with redis_server() as url:
        for callers in CONCURRENCY:
            print(f"  redis store, {callers} callers ...", file=sys.stderr, flush=True)
            rstore = await RedisStore.connect(url, request_unit=unit)
            row = await run_pairs(rstore, callers, max(1, pairs // callers))
            await rstore.close()
            row.update(await ping(url, callers, max(1, pairs // callers)))
            results["redis"].append(row)
        results["redis_commands_per_pair"] = await commands_per_pair(url, unit)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000, help="reserve+settle pairs per concurrency level")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    args = parser.parse_args()
    results = asyncio.run(main_async(args.pairs))
    cols = ["callers", "pairs", "pairs_per_s", "reserve_p50_ms", "reserve_p99_ms", "settle_p50_ms", "settle_p99_ms"]
    print(f"machine: {results['machine']}")
    print_table("embedded store (SQLite, WAL)", results["embedded"], cols)
    print_table("redis store (loopback)", results["redis"], [*cols, "ping_p50_ms", "ping_p99_ms"])
    print(f"\nredis commands per reserve+settle pair: {results['redis_commands_per_pair']:.2f}")
    if args.json:
        emit_json(results)


if __name__ == "__main__":
    main()
