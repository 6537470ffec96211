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
from redis.asyncio.connection import Connection

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


async def round_trips_per_pair(url: str, unit: int) -> tuple[float, float]:
    """(client round trips per reserve+settle pair, server-side µs per script call).

    Round trips are counted where redis-py writes a request to the socket (a
    pipeline counts once); commands run inside a Lua script never cross the
    wire. The server-side time is Redis' own `usec_per_call` for EVALSHA.
    """
    sends = 0
    original = Connection.send_packed_command

    async def counting(self: Connection, command: Any, check_health: bool = True) -> None:
        nonlocal sends
        sends += 1
        await original(self, command, check_health)

    store = await RedisStore.connect(url, request_unit=unit)
    ctl = AdmissionController(store, AdmissionSettings(queue_timeout_s=0), PRICES)
    account = await Accounts(store).create("rt", "subscription", ["standard"])
    ticket = await ctl.reserve(account, "k", MODEL, queue_timeout_s=0)  # warm: scripts loaded
    await ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                     first_token=True, ttft_ms=1)
    client = aioredis.from_url(url)
    await client.config_resetstat()
    n = 200
    Connection.send_packed_command = counting  # type: ignore[method-assign,assignment]
    try:
        for _ in range(n):
            ticket = await ctl.reserve(account, "k", MODEL, queue_timeout_s=0)
            await ctl.settle(ticket, prompt_tokens=1, cached_tokens=0, completion_tokens=1, status="ok",
                             first_token=True, ttft_ms=1)
    finally:
        Connection.send_packed_command = original  # type: ignore[method-assign]
    stats = await client.info("commandstats")
    await client.aclose()
    await store.close()
    evalsha = stats.get("cmdstat_evalsha", {})
    return sends / n, float(evalsha.get("usec_per_call", float("nan")))


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
        trips, usec = await round_trips_per_pair(url, unit)
        results["redis_round_trips_per_pair"] = trips
        results["redis_script_usec_per_call"] = usec
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
    print(f"\nredis round trips per reserve+settle pair: {results['redis_round_trips_per_pair']:.2f} "
          f"(server-side time per admission script: {results['redis_script_usec_per_call']:.1f} µs)")
    print("note: latencies are seen by one Python client process; at 64 callers its event loop, not Redis,\n"
          "dominates (compare the PING column, measured the same way).")
    if args.json:
        emit_json(results)


if __name__ == "__main__":
    main()
