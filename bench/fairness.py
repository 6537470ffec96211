"""Fair dispatch on a saturated model: `fifo` vs `fair` (with and without preemption) in one run.

Rerun (from the repository root; a few minutes with the defaults):

    .venv/bin/python bench/fairness.py [--json]
    .venv/bin/python bench/fairness.py --window-s 30 --warmup-s 5 --max-seqs 4 --tokens-per-s 50 \\
        --ttft-ms 20 --heavy-tokens 256 --light-tokens 32 --interactive-tokens 16 --pause-s 0.5 \\
        --overhead-requests 100 --overhead-tokens 2 --overhead-rounds 3 --json

Four `packserve gateway --engine sim` processes on one redis-server (each on
its own Redis database, so their queues never mix), all up for the whole run:
`--scheduler fifo`, `--scheduler fair --no-preempt` and `--scheduler fair
--preempt` (the default), each with `--sim-max-seqs N`, and one without
--sim-max-seqs (the model is not capacity-scheduled at all). Phases (a) and
(b) run on the three scheduled ones, one after another.

The model is the simulated small one, on which a pack holds 2 concurrency
slots. Accounts on each gateway: one heavy account with 5 standard packs
(weight 5, 10 slots: more requests out than the model runs at once, as with
oversold packs) and four light accounts with 1 pack each (weight 1, 2 slots),
so the weight shares are 5/9 and 1/9 each. Every answer has an exact length
(`ignore_eos`), so the output counts are what was asked; the heavy account's
lengths vary from half to one and a half times --heavy-tokens (seeded), so its
long answers end at different times, as real ones do.

(a) backlogged: every account keeps all its slots busy (closed loops, no
    pause): the heavy one with its long answers, the lights with
    --light-tokens answers. Over --window-s (after --warmup-s): each account's
    share of the output tokens against its weight share; Jain's index over
    weight-normalised service (output tokens / weight; 1.0 = exactly
    proportional); the largest gap in weight-normalised service
    (OUTPUT_WEIGHT x output tokens + INPUT_WEIGHT x prompt tokens, per weight)
    between two backlogged accounts at any time in the window, beside the VTC
    bound 2U of the paper (Theorem 4.4, U = w_p x L_input + w_q x M with M the
    output tokens the model holds in flight: --max-seqs x the longest answer);
    total output tokens/s.
(b) interactive: the heavy account floods as in (a); each light account sends
    one --interactive-tokens request, waits for it, pauses --pause-s, and
    again. The lights' p50/p95 time to first token (client-side, send to the
    first content delta), beside the same lights with the heavy account idle
    (measured on the fair gateway; the model is then unsaturated); total
    output tokens/s under the flood.
(c) overhead: one light account, one request at a time (--overhead-tokens,
    no pause, --overhead-rounds rounds taking turns) on the fair gateway (the
    model unsaturated: every request goes through the store's capacity
    scripts) and on the unscheduled gateway: the p50 TTFT the scheduler adds;
    and the scheduler's store step alone, timed in this process: one
    `capacity_acquire` (the Lua script) on a free sequence, on the same Redis.

`--vllm`: instead, the Ray Serve + vLLM stack with the embedded model
(`build_app` of serve_apps/configs/local.yaml with its chat model alone, as
bench/serving.py deploys it: SmolLM2-135M on CPU, max_num_seqs 16, so the
scheduler's capacity is 16), started once per scheduler (fifo, then
fair without preemption, then fair; --vllm-schedulers picks some), never two
engines at once. On each: a light account (1 pack) sends
short streamed requests one after another (--vllm-light-tokens), first alone
(--vllm-window-s), then while a payg account runs --vllm-heavy-streams
streams (more than max_num_seqs) of answers from half to one and a half
times --vllm-heavy-tokens (seeded, as the heavy account's in (a)): the light
account's p50/p95 TTFT alone and under the flood, and the total output
tokens/s under the flood. The window should hold several heavy answers (one
64-token answer takes ~15 s with 16 sequences on 2 CPU cores). About 6
minutes per scheduler (one vLLM start each):

    .venv/bin/python bench/fairness.py --vllm --vllm-heavy-tokens 64 --vllm-window-s 120 --json

Caveat: the load generator (this process: asyncio + httpx) shares the
machine's cores with the gateways and redis-server (and with --vllm, the
engine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import emit_json, free_port, log, machine, percentile, print_table, process, redis_server
from policies.fairness import INPUT_WEIGHT, OUTPUT_WEIGHT

# A small model: one pack holds 2 of its slots, so the heavy account has 10 requests out against the
# model's --max-seqs (its own slots are more than the model runs at once, as oversold packs are).
MODEL = "hf:packserve/sim-small"
SLOTS_PER_PACK = 2
ADMIN_TOKEN = "bench-fairness-admin"
HEAVY_PACKS = 5
LIGHTS = 4


@dataclass
class Account:
    name: str
    key: str
    weight: int
    model: str = MODEL
    output: int = 0  # output tokens received in the measuring window
    prompt: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (t, weight-normalised service)
    ttfts: list[float] = field(default_factory=list)
    errors: int = 0

    def service(self) -> float:
        return (OUTPUT_WEIGHT * self.output + INPUT_WEIGHT * self.prompt) / self.weight


@dataclass
class Target:
    name: str
    base: str
    heavy: Account
    lights: list[Account]

    def all(self) -> list[Account]:
        return [self.heavy, *self.lights]

    def reset(self) -> None:
        for a in self.all():
            a.output = a.prompt = a.errors = 0
            a.samples.clear()
            a.ttfts.clear()


# The schedulers compared: (label, mode, preempt). "fair" is the default (preemption on).
SCHEDULERS = (("fifo", "fifo", False), (NO_PREEMPT := "fair, no preemption", "fair", False), ("fair", "fair", True))
# Each compared with fifo: (scheduler label, figure key prefix).
RATIOS = (("fair", "fair_vs_fifo"), (NO_PREEMPT, "no_preemption_vs_fifo"))


def gateway_argv(port: int, redis_url: str, args: argparse.Namespace, mode: str | None,
                 preempt: bool = False) -> list[str]:
    argv = [sys.executable, "-m", "serve_apps", "gateway", "--engine", "sim", "--port", str(port),
            "--redis-url", redis_url, "--sim-tokens-per-s", str(args.tokens_per_s), "--sim-ttft-ms", str(args.ttft_ms)]
    if mode is not None:
        argv += ["--scheduler", mode, "--sim-max-seqs", str(args.max_seqs), "--preempt" if preempt else "--no-preempt"]
    return argv


def wait_up(base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise SystemExit(f"gateway at {base} did not answer /health")


def make_accounts(name: str, base: str) -> Target:
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}, timeout=10)

    def key(packs: int) -> str:
        created = admin.post("/admin/v1/accounts", json={"name": "bench", "packs": ["standard"] * packs})
        created.raise_for_status()
        made = admin.post(f"/admin/v1/accounts/{created.json()['id']}/keys")
        made.raise_for_status()
        return str(made.json()["key"])

    heavy = Account("heavy", key(HEAVY_PACKS), HEAVY_PACKS)
    lights = [Account(f"light{i + 1}", key(1), 1) for i in range(LIGHTS)]
    admin.close()
    return Target(name, base, heavy, lights)


class Window:
    """Counts only what arrives between `open()` and `close()`."""

    def __init__(self) -> None:
        self.started: float | None = None
        self.ended: float | None = None

    def counting(self) -> bool:
        return self.started is not None and self.ended is None


async def one_request(client: httpx.AsyncClient, account: Account, tokens: int, window: Window,
                      on_ttft: Callable[[float], None] | None = None) -> None:
    body = {"model": account.model, "stream": True, "max_tokens": tokens, "ignore_eos": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": f"{account.name} asks {time.monotonic_ns()}"}]}
    sent = time.perf_counter()
    first = True
    async with client.stream("POST", "/v1/chat/completions", json=body,
                             headers={"authorization": f"Bearer {account.key}"}) as r:
        if r.status_code != 200:
            await r.aread()
            account.errors += 1
            return
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if choices and choices[0].get("delta", {}).get("content"):
                if first:
                    first = False
                    if on_ttft is not None:
                        on_ttft(time.perf_counter() - sent)
                if window.counting():
                    account.output += 1
            usage = event.get("usage")
            if usage and window.counting():
                account.prompt += int(usage["prompt_tokens"])


async def backlogged(client: httpx.AsyncClient, account: Account, tokens: int, window: Window,
                     rng: random.Random | None = None) -> None:
    while True:
        # With `rng`, lengths vary from half to one and a half times `tokens`, so long answers end at
        # different times (identical ones started together would free the model's sequences in bursts).
        length = tokens if rng is None else rng.randint(max(1, tokens // 2), tokens * 3 // 2)
        await one_request(client, account, length, window)


async def interactive(client: httpx.AsyncClient, account: Account, tokens: int, pause_s: float,
                      window: Window) -> None:
    def record(ttft: float) -> None:
        if window.counting():
            account.ttfts.append(ttft)

    while True:
        await one_request(client, account, tokens, window, record)
        await asyncio.sleep(pause_s)


Worker = Callable[[httpx.AsyncClient, Window], Awaitable[None]]


def flooding(account: Account, tokens: int, seed: int | None = None) -> Worker:
    rng = None if seed is None else random.Random(seed)
    return lambda client, window: backlogged(client, account, tokens, window, rng)


def pausing(account: Account, tokens: int, pause_s: float) -> Worker:
    return lambda client, window: interactive(client, account, tokens, pause_s, window)


async def run_phase(target: Target, workers: list[Worker],
                    args: argparse.Namespace, sample: bool) -> float:
    """Start the workers, count for --window-s after --warmup-s, stop them; returns the window's length."""
    target.reset()
    window = Window()
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=target.base, timeout=600, limits=limits) as client:
        tasks = [asyncio.ensure_future(w(client, window)) for w in workers]
        await asyncio.sleep(args.warmup_s)
        window.started = time.monotonic()
        while time.monotonic() - window.started < args.window_s:
            await asyncio.sleep(0.2)
            if sample:
                now = time.monotonic() - window.started
                for a in target.all():
                    a.samples.append((now, a.service()))
        window.ended = time.monotonic()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return window.ended - window.started


def jain(values: list[float]) -> float:
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else float("nan")


def largest_gap(accounts: list[Account]) -> float:
    """The largest difference in weight-normalised service between two accounts at any sample."""
    gap = 0.0
    for i in range(min(len(a.samples) for a in accounts)):
        values = [a.samples[i][1] for a in accounts]
        gap = max(gap, max(values) - min(values))
    return gap


async def backlogged_phase(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    workers = [flooding(target.heavy, args.heavy_tokens, i) for i in range(HEAVY_PACKS * SLOTS_PER_PACK)]
    workers += [flooding(a, args.light_tokens) for a in target.lights for _ in range(SLOTS_PER_PACK)]
    seconds = await run_phase(target, workers, args, sample=True)
    total = sum(a.output for a in target.all())
    weights = sum(a.weight for a in target.all())
    shares = {a.name: (a.output / total if total else 0.0) for a in target.all()}
    ratios = {a.name: shares[a.name] / (a.weight / weights) for a in target.all()}
    return {
        "scheduler": target.name, "heavy_share": shares["heavy"], "heavy_weight_share": HEAVY_PACKS / weights,
        "light_share_min": min(shares[a.name] for a in target.lights),
        "light_share_max": max(shares[a.name] for a in target.lights),
        "light_weight_share": 1 / weights,
        "worst_share_ratio": max(ratios.values(), key=lambda r: abs(r - 1)),
        "jain": jain([a.output / a.weight for a in target.all()]),
        "max_gap": largest_gap(target.all()),
        "tokens_per_s": total / seconds,
        "errors": sum(a.errors for a in target.all()),
    }


async def interactive_phase(target: Target, args: argparse.Namespace, flood: bool) -> dict[str, Any]:
    workers: list[Worker] = []
    if flood:
        workers += [flooding(target.heavy, args.heavy_tokens, i) for i in range(HEAVY_PACKS * SLOTS_PER_PACK)]
    workers += [pausing(a, args.interactive_tokens, args.pause_s) for a in target.lights]
    seconds = await run_phase(target, workers, args, sample=False)
    ttfts = [t for a in target.lights for t in a.ttfts]
    return {
        "scheduler": target.name if flood else f"{target.name}, heavy idle",
        "light_requests": len(ttfts), "light_ttft_p50_ms": percentile(ttfts, 50) * 1000,
        "light_ttft_p95_ms": percentile(ttfts, 95) * 1000,
        "tokens_per_s": sum(a.output for a in target.all()) / seconds,
        "errors": sum(a.errors for a in target.all()),
    }


async def overhead_phase(target: Target, args: argparse.Namespace) -> dict[str, Any]:
    light = target.lights[0]
    ttfts: list[float] = []
    window = Window()
    window.started = time.monotonic()
    async with httpx.AsyncClient(base_url=target.base, timeout=60) as client:
        for _ in range(args.overhead_requests):
            await one_request(client, light, args.overhead_tokens, window, ttfts.append)
    return {"gateway": target.name, "requests": len(ttfts), "ttft_p50_ms": percentile(ttfts, 50) * 1000,
            "ttft_p95_ms": percentile(ttfts, 95) * 1000}


async def measure(targets: dict[str, Target], args: argparse.Namespace) -> dict[str, Any]:
    fair, plain = targets["fair"], targets["unscheduled"]
    compared = [targets[label] for label, _, _ in SCHEDULERS]
    figures: dict[str, Any] = {}
    if "a" in args.phases:
        log("(a) everyone backlogged ...")
        figures["backlogged"] = [await backlogged_phase(t, args) for t in compared]
    if "b" in args.phases:
        log("(b) interactive lights under a heavy flood ...")
        inter = [await interactive_phase(t, args, flood=True) for t in compared]
        inter.append(await interactive_phase(fair, args, flood=False))
        figures["interactive"] = inter
        figures.update(versus_fifo(inter))
    if "c" in args.phases:
        log("(c) scheduler overhead, model unsaturated ...")
        figures["overhead"] = await overhead(fair, plain, args)
        figures["scheduler_added_p50_ms"] = figures["overhead"][0]["ttft_p50_ms"] - figures["overhead"][1][
            "ttft_p50_ms"]
        figures["store_step"] = await store_step(args.redis_url, args)
    figures["vtc_bound"] = 2 * (INPUT_WEIGHT * args.prompt_bound
                                + OUTPUT_WEIGHT * args.max_seqs * (args.heavy_tokens * 3 // 2))
    return figures


async def store_step(redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The scheduler's own step on a free sequence, alone: one `capacity_acquire` on the Redis store."""
    from cluster.redis_store import RedisStore
    from cluster.store import CapacityTerms
    from policies.fairness import SchedulerMode

    store = await RedisStore.connect(redis_url, request_unit=1)
    terms = CapacityTerms("hf:bench/step", args.max_seqs, SchedulerMode.FAIR, 30_000)
    acquire: list[float] = []
    try:
        for i in range(args.overhead_requests * args.overhead_rounds):
            started = time.perf_counter()
            await store.capacity_acquire(terms, "acct", f"e{i}", 60_000)
            acquire.append(time.perf_counter() - started)
            await store.capacity_release(terms, f"e{i}", 0)
    finally:
        await store.close()
    return {"steps": len(acquire), "acquire_p50_ms": percentile(acquire, 50) * 1000,
            "acquire_p95_ms": percentile(acquire, 95) * 1000}


async def overhead(fair: Target, plain: Target, args: argparse.Namespace) -> list[dict[str, Any]]:
    # Alternating rounds, so background load hits both alike.
    rounds: dict[str, list[dict[str, Any]]] = {"fair": [], "unscheduled": []}
    for _ in range(args.overhead_rounds):
        for t in (fair, plain):
            rounds["fair" if t is fair else "unscheduled"].append(await overhead_phase(t, args))
    return [{"gateway": name, "requests": sum(r["requests"] for r in rs),
             "ttft_p50_ms": sorted(r["ttft_p50_ms"] for r in rs)[len(rs) // 2],
             "ttft_p95_ms": sorted(r["ttft_p95_ms"] for r in rs)[len(rs) // 2]} for name, rs in rounds.items()]


# ----------------------------------------------------------------- Ray Serve + vLLM (--vllm)


@contextlib.contextmanager
def vllm_stack(data_dir: Path, redis_url: str, mode: str, preempt: bool) -> Any:
    """local.yaml's chat model on Ray Serve + vLLM (bench/serving.py's deployment) with scheduler `mode`.

    Yields (gateway base URL, admin token, model id).
    """
    import secrets

    from ray import serve

    from bench.serving import START_TIMEOUT_S, packserve_config
    from serve_apps.catalog.build import SMOLLM_ID
    from serve_apps.deploy import ray_env
    from serve_apps.deploy.ray_app import APP_NAME, build_app
    from serve_apps.deploy.serving_plan import deployment_name

    port = free_port()
    admin_token = secrets.token_urlsafe(16)
    config = packserve_config(data_dir, redis_url, port)
    from policies.fairness import SchedulerMode

    config = config.model_copy(
        update={"scheduler": config.scheduler.model_copy(update={"mode": SchedulerMode(mode), "preempt": preempt})})
    log(f"vllm ({mode}, preempt {preempt}): starting Ray and Serve on port {port}")
    node = ray_env.init_local(ray_env.engine_cpu_split(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        serve.run(build_app(config, admin_token=admin_token), name=APP_NAME, route_prefix="/", blocking=False)
        handle = serve.get_deployment_handle(deployment_name(SMOLLM_ID), app_name=APP_NAME)
        handle.ready.remote().result(timeout_s=START_TIMEOUT_S)
        handle.shutdown()  # type: ignore[no-untyped-call]
        base = f"http://127.0.0.1:{port}"
        wait_up(base)
        yield base, admin_token, SMOLLM_ID
    finally:
        log(f"vllm ({mode}, preempt {preempt}): stopping Ray")
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray_env.shutdown_local(node)


def vllm_accounts(base: str, admin_token: str, model: str, mode: str, args: argparse.Namespace) -> Target:
    """A payg account with a stream per --vllm-heavy-streams, and a light one with 1 pack."""
    admin = httpx.Client(base_url=base, headers={"authorization": f"Bearer {admin_token}"}, timeout=30)

    def key(account: dict[str, Any]) -> str:
        created = admin.post("/admin/v1/accounts", json={"name": "bench-fairness", **account})
        created.raise_for_status()
        made = admin.post(f"/admin/v1/accounts/{created.json()['id']}/keys")
        made.raise_for_status()
        return str(made.json()["key"])

    heavy = Account("payg", key({"plan": "payg", "concurrency": args.vllm_heavy_streams}), 1, model)
    light = Account("light", key({"plan": "subscription", "packs": ["standard"]}), 1, model)
    admin.close()
    return Target(mode, base, heavy, [light])


async def vllm_scenario(target: Target, mode: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    heavy, light = target.heavy, target.lights[0]
    rows = []
    for flood in (False, True):
        workers: list[Worker] = [pausing(light, args.vllm_light_tokens, 0.0)]
        if flood:
            workers += [flooding(heavy, args.vllm_heavy_tokens, i) for i in range(args.vllm_heavy_streams)]
        window = argparse.Namespace(warmup_s=args.warmup_s, window_s=args.vllm_window_s)
        seconds = await run_phase(target, workers, window, sample=False)
        rows.append({"scheduler": mode if flood else f"{mode}, light alone", "light_requests": len(light.ttfts),
                     "light_ttft_p50_ms": percentile(light.ttfts, 50) * 1000,
                     "light_ttft_p95_ms": percentile(light.ttfts, 95) * 1000,
                     "tokens_per_s": (heavy.output + light.output) / seconds,
                     "errors": heavy.errors + light.errors})
        log(f"vllm ({rows[-1]['scheduler']}): light p50/p95 TTFT {rows[-1]['light_ttft_p50_ms']:.0f} / "
            f"{rows[-1]['light_ttft_p95_ms']:.0f} ms")
    return rows


def run_vllm(args: argparse.Namespace) -> dict[str, Any]:
    from bench.serving import embedded_models
    from serve_apps.catalog.build import SMOLLM_ID

    data_dir, _ = embedded_models(args, (SMOLLM_ID,))
    rows: list[dict[str, Any]] = []
    with redis_server() as url:
        for db, (label, mode, preempt) in enumerate(SCHEDULERS):
            if label not in args.vllm_schedulers.split("|"):
                continue
            with vllm_stack(data_dir, f"{url[:-1]}{db}", mode, preempt) as (base, token, model):
                target = vllm_accounts(base, token, model, label, args)
                rows += asyncio.run(vllm_scenario(target, label, args))
    return {"vllm": rows, **versus_fifo(rows)}


def versus_fifo(rows: list[dict[str, Any]]) -> dict[str, float]:
    """The fair schedulers' light p95 TTFT and total tokens/s under the flood over fifo's (of the rows run)."""
    by = {row["scheduler"]: row for row in rows}
    if "fifo" not in by:
        return {}
    fifo = by["fifo"]
    figures: dict[str, float] = {}
    for label, key in RATIOS:
        if label in by:
            p95 = fifo["light_ttft_p95_ms"]
            figures[f"{key}_light_p95"] = by[label]["light_ttft_p95_ms"] / p95 if p95 else float("nan")
            figures[f"{key}_tokens_per_s"] = by[label]["tokens_per_s"] / fifo["tokens_per_s"]
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-seqs", type=int, default=4, help="sequences the simulated model runs at once")
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="simulated decode speed per sequence")
    parser.add_argument("--ttft-ms", type=float, default=20.0, help="simulated time to first token")
    parser.add_argument("--heavy-tokens", type=int, default=256, help="the heavy account's answer length")
    parser.add_argument("--light-tokens", type=int, default=32, help="the lights' answer length in (a)")
    parser.add_argument("--interactive-tokens", type=int, default=16, help="the lights' answer length in (b), (c)")
    parser.add_argument("--pause-s", type=float, default=0.5, help="a light's pause between requests in (b)")
    parser.add_argument("--window-s", type=float, default=30.0, help="measuring window of each phase")
    parser.add_argument("--warmup-s", type=float, default=5.0, help="load before each window, not counted")
    parser.add_argument("--overhead-requests", type=int, default=100, help="requests per round in (c)")
    parser.add_argument("--overhead-tokens", type=int, default=2, help="answer length in (c)")
    parser.add_argument("--overhead-rounds", type=int, default=3)
    parser.add_argument("--prompt-bound", type=int, default=32, help="the longest prompt, in tokens (for the bound)")
    parser.add_argument("--phases", default="abc", help="which of the phases (a), (b), (c) to run")
    parser.add_argument("--vllm", action="store_true", help="the Ray Serve + vLLM scenario instead (see above)")
    parser.add_argument("--vllm-heavy-streams", type=int, default=24, help="the payg account's streams")
    parser.add_argument("--vllm-heavy-tokens", type=int, default=256)
    parser.add_argument("--vllm-light-tokens", type=int, default=16)
    parser.add_argument("--vllm-window-s", type=float, default=45.0)
    parser.add_argument("--vllm-schedulers", default="|".join(label for label, _, _ in SCHEDULERS),
                        help="--vllm: which schedulers to start, '|'-separated (one vLLM start each)")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="--vllm: where the embedded model is built (default: PACKSERVE_DATA_DIR or "
                             "~/.local/share)")
    parser.add_argument("--json", action="store_true", help="also print the figures as one JSON line at the end")
    args = parser.parse_args()
    if args.vllm:
        vllm_figures = run_vllm(args)
        print(f"packserve fairness benchmark on Ray Serve + vLLM, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, "
              f"{machine()}")
        print_table(f"light account ({args.vllm_light_tokens}-token answers, one after another), alone and "
                    f"beside a payg account's {args.vllm_heavy_streams} streams of {args.vllm_heavy_tokens} tokens "
                    "(max_num_seqs 16)", vllm_figures["vllm"],
                    ["scheduler", "light_requests", "light_ttft_p50_ms", "light_ttft_p95_ms", "tokens_per_s",
                     "errors"])
        print_ratios(vllm_figures)
        if args.json:
            emit_json({"benchmark": "fairness-vllm", "machine": machine(), **vars(args),
                       "data_dir": str(args.data_dir), **vllm_figures})
        return

    env = {"PACKSERVE_ADMIN_TOKEN": ADMIN_TOKEN}
    load_before = os.getloadavg()
    with ExitStack() as stack:
        url = stack.enter_context(redis_server())
        targets: dict[str, Target] = {}
        gateways = [*SCHEDULERS, ("unscheduled", None, False)]
        for db, (name, mode, preempt) in enumerate(gateways):
            port = free_port()
            data_dir = stack.enter_context(_tempdir())
            argv = gateway_argv(port, f"{url[:-1]}{db}", args, mode, preempt)
            stack.enter_context(process(f"gateway-{name.replace(', ', '-').replace(' ', '-')}", argv,
                                        env={**env, "PACKSERVE_DATA_DIR": data_dir}))
            base = f"http://127.0.0.1:{port}"
            wait_up(base)
            targets[name] = make_accounts(name, base)
        args.redis_url = f"{url[:-1]}{len(gateways)}"
        figures = asyncio.run(measure(targets, args))
    # A shared machine: how busy it was says how far to trust the figures.
    figures["load_average_before"], figures["load_average_after"] = load_before, os.getloadavg()

    print(f"packserve fairness benchmark, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {machine()}")
    print(f"simulated model: --sim-max-seqs {args.max_seqs}, {args.tokens_per_s:g} tokens/s per sequence, "
          f"TTFT {args.ttft_ms:g} ms; {MODEL}; heavy: {HEAVY_PACKS} packs, {HEAVY_PACKS * SLOTS_PER_PACK} streams of "
          f"{args.heavy_tokens // 2}-{args.heavy_tokens * 3 // 2}-token answers; {LIGHTS} lights: 1 pack each")
    print(f"load average (1, 5, 15 min) before: {figures['load_average_before']}, "
          f"after: {figures['load_average_after']}")
    if "backlogged" in figures:
        print_table(f"(a) everyone backlogged ({args.window_s:g} s window; lights answer {args.light_tokens} tokens; "
                f"VTC bound 2U = {figures['vtc_bound']} weighted tokens)", figures["backlogged"],
                ["scheduler", "heavy_share", "heavy_weight_share", "light_share_min", "light_share_max",
                 "light_weight_share", "worst_share_ratio", "jain", "max_gap", "tokens_per_s", "errors"])
    if "interactive" in figures:
        print_table(f"(b) interactive lights ({args.interactive_tokens}-token answers, {args.pause_s:g} s pauses) "
                "under the heavy flood", figures["interactive"],
                ["scheduler", "light_requests", "light_ttft_p50_ms", "light_ttft_p95_ms", "tokens_per_s", "errors"])
    if "overhead" in figures:
        print_table("(c) one light stream, model unsaturated (median of rounds)", figures["overhead"],
                ["gateway", "requests", "ttft_p50_ms", "ttft_p95_ms"])
    if "interactive" in figures:
        print_ratios(figures)
    if "overhead" in figures:
        step = figures["store_step"]
        print(f"p50 TTFT the scheduler adds, model unsaturated: {figures['scheduler_added_p50_ms']:+.2f} ms; "
              f"its store step alone (capacity_acquire on Redis, {step['steps']} calls): p50 "
              f"{step['acquire_p50_ms']:.3f} ms, p95 {step['acquire_p95_ms']:.3f} ms")
    if args.json:
        emit_json({"benchmark": "fairness", "machine": machine(), "cpus": os.cpu_count(), **vars(args), **figures})


def print_ratios(figures: dict[str, Any]) -> None:
    print()
    for label, key in RATIOS:
        if f"{key}_light_p95" in figures:
            print(f"{label} / fifo: lights' p95 TTFT under the flood {figures[f'{key}_light_p95']:.3f}, "
                  f"total tokens/s {figures[f'{key}_tokens_per_s']:.3f}")


@contextlib.contextmanager
def _tempdir() -> Any:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as d:
        yield d


if __name__ == "__main__":  # vLLM and Ray spawn processes that re-import this module
    main()
