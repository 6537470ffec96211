"""Soak and connection abuse against one `packserve gateway --engine sim` process (Redis store).

Phases, with /health timed once a second throughout (from a process of its
own), on the API port (answered by the event loop) and on the health port
(`--health-port`: its own thread, which also reports the loop's lag), and the
gateway's RSS and CPU sampled from /proc:

1. `--streams` (1,000) concurrent chat streams for `--minutes` (10): each
   client streams, reads to the end, and starts again, until time is up;
   TTFT per stream, requests completed, errors by kind. The streams come
   from `--clients` processes (one Python process cannot read 1,000 streams
   without its own event loop falling behind, which would show as the
   server's latency).
2. `--idle` (1,000) keep-alive connections that sent one request and then sit
   idle for `--abuse-s` seconds.
3. `--slow` (200) slow-header clients that trickle a request's headers one
   byte every 2 s for `--abuse-s` seconds.

At the end: RSS after the run against its plateau (the median of phase 1's
second half), leases and queue entries left in Redis once every client has
gone, p50/p99 TTFT, gateway CPU seconds per request, /health latency on
both ports and the loop lag (p50, p99 and max) per phase, the connections the gateway still held at the
end of phases 2 and 3 (its established sockets, from /proc/net/tcp), and
the gateway's warning and error log lines by message.

The load generators (the stream processes and phases 2 and 3) run at nice
19: on a small machine they stand in for clients on other machines, and at
the gateway's priority they would take the CPU it needs and show up as its
latency. The /health prober stays at the gateway's priority.

    python -m bench.soak                 # the full run: 10 minutes of streams
    python -m bench.soak --minutes 2 --json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from redis.asyncio import Redis

from bench.common import (
    ROOT,
    cpu_seconds,
    emit_json,
    free_port,
    log,
    machine,
    percentile,
    print_table,
    process,
    redis_server,
)

ADMIN = "soak-admin-token"
MODEL = "hf:packserve/sim-small"
SLOTS_PER_ACCOUNT = 10  # 5 founder packs: 2 sim-small streams each
CLIENT_NICE = 19


def schedstat(pid: int) -> tuple[float, float]:
    """(seconds on a CPU, seconds runnable but waiting for one) of all the process's threads so far."""
    on_cpu = waiting = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/schedstat") as f:
            fields = f.read().split()
            on_cpu += int(fields[0])
            waiting += int(fields[1])
    return on_cpu / 1e9, waiting / 1e9


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed_get(client: httpx.Client, url: str) -> tuple[float | None, dict[str, Any]]:
    """(milliseconds, JSON body) of one GET on a fresh connection; None for a failure or a non-200."""
    t0 = time.perf_counter()
    try:
        r = client.get(url, headers={"connection": "close"})
    except httpx.HTTPError:
        return None, {}
    latency = (time.perf_counter() - t0) * 1000
    return (latency, r.json()) if r.status_code == 200 else (None, {})


def sampler(pid: int, base: str, health_base: str, out_path: str, stop: Any) -> None:
    """In its own process (so the load generators' busy loops never delay it): once a second, the
    gateway's RSS, how long /health takes on a fresh connection on the API port (answered by the event
    loop) and on the health port (its own thread), and the loop lag the latter reports, as JSON lines."""
    with open(out_path, "w") as out, httpx.Client(timeout=10) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            api_ms, _ = timed_get(client, f"{base}/health")
            port_ms, body = timed_get(client, f"{health_base}/health")
            out.write(json.dumps({"t": time.time(), "rss_mb": rss_mb(pid), "health_ms": api_ms,
                                  "health_port_ms": port_ms, "loop_lag_ms": body.get("loop_lag_ms")}) + "\n")
            out.flush()
            stop.wait(max(0.0, 1.0 - (time.perf_counter() - t0)))


async def stream_loop(client: httpx.AsyncClient, key: str, deadline: float, max_tokens: int, start_s: float,
                      ttfts: list[float], outcomes: Counter[str]) -> None:
    body = {"model": MODEL, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "soak"}]}
    await asyncio.sleep(start_s)
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        first = True
        try:
            async with client.stream("POST", "/v1/chat/completions", json=body,
                                     headers={"authorization": f"Bearer {key}"}) as r:
                if r.status_code != 200:
                    try:
                        code = json.loads(await r.aread())["error"]["code"]
                    except (ValueError, KeyError, TypeError):
                        code = "unknown"
                    outcomes[f"http_{r.status_code}_{code}"] += 1
                    await asyncio.sleep(1)
                    continue
                done = False
                async for line in r.aiter_lines():
                    if first and line.startswith("data: {") and '"content"' in line:
                        ttfts.append((time.perf_counter() - t0) * 1000)
                        first = False
                    if line == "data: [DONE]":
                        done = True
                outcomes["ok" if done else "no_done"] += 1
        except httpx.HTTPError as exc:
            outcomes[type(exc).__name__] += 1
            await asyncio.sleep(1)


def gateway_log_lines(pid: int) -> dict[str, int]:
    """The gateway's warning and error log lines by level and message (its stdout is the log file)."""
    counts: Counter[str] = Counter()
    with contextlib.suppress(OSError), open(os.readlink(f"/proc/{pid}/fd/1"), errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                counts[f"(not JSON) {line.strip()[:80]}"] += 1
                continue
            if isinstance(record, dict) and record.get("level") in ("warning", "error", "critical"):
                # The error's text, numbers (ports, ids, counts) left out so that like errors count together.
                error = re.sub(r"\d+", "N", str(record.get("error", "")))[:100]
                counts[f"{record['level']}: {record.get('msg')}" + (f" ({error})" if error else "")] += 1
    return dict(counts)


def read_samples(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    path.unlink()
    return rows


def stream_worker(base: str, stream_keys: list[str], deadline_wall: float,
                  max_tokens: int, ramp_s: float) -> tuple[list[float], dict[str, int]]:
    """One load-generating process: a stream loop per entry of `stream_keys`, each with that key.

    Each loop starts at a random moment of the first `ramp_s`: the streams all
    last as long, so loops started together would stay in step, and the
    gateway would see every stream end and 1,000 requests arrive in the same
    second, over and over, which no set of independent clients does.
    """
    os.nice(CLIENT_NICE - os.nice(0))
    async def go() -> tuple[list[float], dict[str, int]]:
        ttfts: list[float] = []
        outcomes: Counter[str] = Counter()
        deadline = time.monotonic() + (deadline_wall - time.time())
        streams = len(stream_keys)
        limits = httpx.Limits(max_connections=streams + 10, max_keepalive_connections=streams + 10)
        async with httpx.AsyncClient(base_url=base, timeout=300, limits=limits) as client:
            await asyncio.gather(*(stream_loop(client, key, deadline, max_tokens, random.uniform(0, ramp_s),
                                               ttfts, outcomes) for key in stream_keys))
        return ttfts, dict(outcomes)
    return asyncio.run(go())


def established(port: int) -> int:
    """Established TCP sockets whose local port is `port`: the server's side of its connections."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                count += int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01"
    return count


async def read_response(reader: asyncio.StreamReader) -> None:
    """One whole response with a Content-Length (headers and body may arrive in separate segments)."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)


async def idle_connections(host: str, port: int, n: int, hold_s: float) -> tuple[int, int]:
    """n keep-alive connections, each after one whole response, left idle for hold_s.

    Returns how many the server still held at the end (its established
    sockets, less those it held before) and how many the client saw open (no EOF).
    """
    before = established(port)
    writers: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    for _ in range(n):
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            continue
        writer.write(b"GET /health HTTP/1.1\r\nHost: soak\r\nConnection: keep-alive\r\n\r\n")
        readers.append(reader)
        writers.append(writer)
    await asyncio.gather(*(w.drain() for w in writers), return_exceptions=True)
    await asyncio.gather(*(read_response(r) for r in readers), return_exceptions=True)
    await asyncio.sleep(hold_s)
    server_held = max(0, established(port) - before)
    still_open = 0
    for reader, writer in zip(readers, writers, strict=True):
        # A connection the server closed reads EOF at once; an open one times out.
        try:
            eof = await asyncio.wait_for(reader.read(1), 0.01) == b""
        except TimeoutError:
            eof = False
        except OSError:
            eof = True
        still_open += not eof
        writer.close()
    return server_held, still_open


async def slow_headers(host: str, port: int, n: int, hold_s: float) -> tuple[int, int]:
    """n clients trickling one header byte every 2 s for hold_s.

    Returns how many connections the server held at the end (established
    sockets, less those it held before) and how many still took a byte.
    """
    before = established(port)
    request = b"GET /health HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"a" * 1000
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(n):
        with contextlib.suppress(OSError):
            conns.append(await asyncio.open_connection(host, port))
    deadline = time.monotonic() + hold_s
    i = 0
    open_now = len(conns)
    while time.monotonic() < deadline and i < len(request):
        open_now = 0
        for _, writer in conns:
            if writer.is_closing():
                continue
            try:
                writer.write(request[i:i + 1])
                await writer.drain()
                open_now += 1
            except OSError:
                writer.close()
        i += 1
        await asyncio.sleep(2)
    server_held = max(0, established(port) - before)
    for _, writer in conns:
        writer.close()
    return server_held, open_now


async def leftovers(redis_url: str) -> dict[str, int]:
    """Lease and queue entries still in Redis (every client has gone)."""
    client: Any = Redis.from_url(redis_url)
    try:
        counts = {"leases": 0, "queue_entries": 0}
        async for key in client.scan_iter(match="packserve:*", count=1000):
            name = key.decode()
            if ":lease:" in name:
                counts["leases"] += await client.zcard(key)
            elif ":queue:" in name:
                counts["queue_entries"] += await client.llen(key) if (await client.type(key)) == b"list" \
                    else await client.zcard(key)
        return counts
    finally:
        await client.aclose()


async def run(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    port, health_port = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "serve_apps", "--redis-url", redis_url, "gateway", "--engine", "sim",
            "--port", str(port), "--sim-tokens-per-s", str(args.tokens_per_s), "--health-port", str(health_port)]
    env = {"PACKSERVE_ADMIN_TOKEN": ADMIN, "PYTHONPATH": str(ROOT)}
    with process("soak-gateway", argv, env=env, ready="packserve gateway", unset=("PACKSERVE_REDIS_URL",)) as gw:
        admin = httpx.AsyncClient(base_url=base, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
        for _ in range(100):
            with contextlib.suppress(httpx.HTTPError):
                if (await admin.get("/health")).status_code == 200:
                    break
            await asyncio.sleep(0.2)
        keys: list[str] = []
        for _ in range(-(-args.streams // SLOTS_PER_ACCOUNT)):
            acct = (await admin.post("/admin/v1/accounts", json={"name": "soak", "packs": ["founder"] * 5})).json()
            keys.append((await admin.post(f"/admin/v1/accounts/{acct['id']}/keys")).json()["key"])
        ctx = multiprocessing.get_context("spawn")
        stop = ctx.Event()
        samples_path = os.path.join(tempfile.gettempdir(), f"soak-samples-{port}.jsonl")
        prober = ctx.Process(target=sampler, args=(gw.pid, base, f"http://127.0.0.1:{health_port}", samples_path,
                                                   stop), daemon=True)
        prober.start()
        # From here on this process only generates load (phases 2 and 3) and starts the stream processes.
        os.nice(CLIENT_NICE - os.nice(0))
        phases: list[tuple[str, float]] = []

        log(f"phase 1: {args.streams} streams for {args.minutes} min, from {args.clients} client processes")
        phases.append(("streams", time.time()))
        cpu0 = cpu_seconds([gw.pid])
        sched0 = schedstat(gw.pid)
        t0 = time.monotonic()
        deadline_wall = time.time() + args.minutes * 60
        per_client = -(-args.streams // args.clients)
        ramp_s = args.max_tokens / args.tokens_per_s if args.ramp_s is None else args.ramp_s
        jobs = []
        for c in range(args.clients):
            n = min(per_client, args.streams - c * per_client)
            # Each stream its own slot: stream g (over all clients) uses account g // SLOTS_PER_ACCOUNT, so no
            # account gets more streams than slots when a client's share is not a multiple of them.
            stream_keys = [keys[g // SLOTS_PER_ACCOUNT] for g in range(c * per_client, c * per_client + n)]
            jobs.append((base, stream_keys, deadline_wall, args.max_tokens, ramp_s))
        with ctx.Pool(args.clients) as pool:
            results = await asyncio.to_thread(pool.starmap, stream_worker, jobs)
        ttfts = [t for r in results for t in r[0]]
        outcomes: Counter[str] = Counter()
        for r in results:
            outcomes.update(r[1])
        stream_s = time.monotonic() - t0
        stream_cpu = cpu_seconds([gw.pid]) - cpu0
        sched1 = schedstat(gw.pid)

        phases.append(("idle", time.time()))
        log(f"phase 2: {args.idle} idle keep-alive connections for {args.abuse_s} s")
        idle_held, idle_open = await idle_connections("127.0.0.1", port, args.idle, args.abuse_s)
        phases.append(("slow", time.time()))
        log(f"phase 3: {args.slow} slow-header clients for {args.abuse_s} s")
        slow_held, slow_open = await slow_headers("127.0.0.1", port, args.slow, args.abuse_s)
        phases.append(("after", time.time()))
        await asyncio.sleep(5)
        stop.set()
        prober.join(timeout=15)
        end_rss = rss_mb(gw.pid)
        left = await leftovers(redis_url)
        await admin.aclose()
        log_lines = gateway_log_lines(gw.pid)

    rows = await asyncio.to_thread(read_samples, Path(samples_path))

    def phase_of(t: float) -> str:
        return [name for name, start in phases if start <= t][-1] if t >= phases[0][1] else "setup"

    by_phase: dict[str, dict[str, list[float]]] = {"health": {}, "health_port": {}, "loop_lag": {}}
    for row in rows:
        for name, field in (("health", "health_ms"), ("health_port", "health_port_ms"), ("loop_lag", "loop_lag_ms")):
            if row[field] is not None:
                by_phase[name].setdefault(phase_of(row["t"]), []).append(row[field])
    stream_rss = [row["rss_mb"] for row in rows if phase_of(row["t"]) == "streams"]
    plateau = statistics.median(stream_rss[len(stream_rss) // 2:]) if stream_rss else float("nan")
    done = outcomes.get("ok", 0)
    health: dict[str, Any] = {}
    for name, phases_values in by_phase.items():
        for phase, values in phases_values.items():
            health[f"{name}_{phase}_p50_ms"] = round(percentile(values, 50), 1)
            health[f"{name}_{phase}_p99_ms"] = round(percentile(values, 99), 1)
            health[f"{name}_{phase}_max_ms"] = round(max(values), 1)
    health_ms, port_ms = by_phase["health"], by_phase["health_port"]
    return {
        "streams": args.streams, "minutes": args.minutes, "tokens_per_s": args.tokens_per_s,
        "ramp_s": args.max_tokens / args.tokens_per_s if args.ramp_s is None else args.ramp_s,
        "max_tokens": args.max_tokens, "requests_ok": done, "outcomes": dict(outcomes),
        "ttft_p50_ms": round(percentile(ttfts, 50), 1), "ttft_p99_ms": round(percentile(ttfts, 99), 1),
        "cpu_ms_per_request": round(stream_cpu / max(done, 1) * 1000, 2),
        # Phase 1, as shares of its wall time: the gateway on a CPU, and runnable but waiting for one
        # (the machine's other processes had it).
        "gateway_on_cpu_share": round((sched1[0] - sched0[0]) / stream_s, 3),
        "gateway_runqueue_wait_share": round((sched1[1] - sched0[1]) / stream_s, 3),
        "rss_plateau_mb": round(plateau, 1), "rss_end_mb": round(end_rss, 1),
        "rss_end_vs_plateau_pct": round((end_rss / plateau - 1) * 100, 1),
        "idle_connections_held_by_server": idle_held, "idle_connections_open_to_client": idle_open,
        "slow_header_connections_held_by_server": slow_held, "slow_header_clients_still_sending": slow_open,
        "gateway_log": log_lines,
        "leftover_leases": left["leases"], "leftover_queue_entries": left["queue_entries"],
        **health, "health_failures": sum(row["health_ms"] is None for row in rows),
        "health_over_100ms": sum(1 for v in health_ms.values() for x in v if x > 100),
        "health_port_failures": sum(row["health_port_ms"] is None for row in rows),
        "health_port_over_100ms": sum(1 for v in port_ms.values() for x in v if x > 100),
        "health_samples": sum(len(v) for v in health_ms.values()), "stream_phase_s": round(stream_s, 1),
        "machine": machine(), "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="phase 1 duration (default 10)")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=1000)
    parser.add_argument("--slow", type=int, default=200)
    parser.add_argument("--abuse-s", type=float, default=30.0, help="phases 2 and 3 duration each (default 30)")
    parser.add_argument("--tokens-per-s", type=float, default=2.0, help="simulated decode speed per stream")
    parser.add_argument("--max-tokens", type=int, default=20, help="tokens per stream (20 at 2/s: 10 s streams)")
    parser.add_argument("--clients", type=int, default=4, help="load-generating processes for the streams")
    parser.add_argument("--ramp-s", type=float, default=None,
                        help="streams start at random over this many seconds (default: one stream's length; "
                             "0: all at once, in step)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line at the end")
    args = parser.parse_args()
    with redis_server() as url:
        figures = asyncio.run(run(args, url))
    rows = [{"figure": k, "value": json.dumps(v) if isinstance(v, dict) else v} for k, v in figures.items()]
    print_table(f"soak: one gateway process, simulated engine ({figures['machine']})", rows, ["figure", "value"])
    if args.json:
        emit_json(figures)


if __name__ == "__main__":
    main()
