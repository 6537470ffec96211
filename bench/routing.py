"""Routing: prefix-cache hit ratio and time to first token, affinity vs Ray's default routing; cold start.

Rerun (from the repository root):

    .venv/bin/python bench/routing.py [--json]
    .venv/bin/python bench/routing.py --conversations 32 --turns 6 --concurrency 8 --max-tokens 32 \\
        --prefill-ms-per-token 1.0 --tokens-per-s 100 [--engine sim|vllm] [--json]
    .venv/bin/python bench/routing.py --engine vllm --conversations 8 --turns 5 --concurrency 4 \\
        --max-tokens 32 --context-chars 1500 --json     # the recorded vLLM run

Starts a local Ray (this machine's cores) and deploys one model at a time,
exactly as `build_app` deploys it (`ray_app.model_deployment`), as its own
Serve application, then drives it from this process through a
DeploymentHandle (the router runs where the handle is, as in the gateway; the
gateway's own per-request work is the same for every variant and left out):

  affinity  2 replicas, `routing: affinity` (serve_apps.deploy.routing)
  default   2 replicas, `routing: default` (Ray's power of two choices)
  single    1 replica: the hit-ratio reference (one cache sees every turn)

Workload: `--conversations` conversations of `--turns` turns, each turn's
prompt the previous prompt plus the model's answer plus a new user message,
all conversations sharing a system prompt. `--concurrency` workers take the
next pending turn of any conversation, so turns of different conversations
interleave as with many users. `--context-chars N` gives each conversation
N characters of its own code in its first message, as a coding agent's
session carries its files. Hit ratio = sum(cached_tokens) /
sum(prompt_tokens) from the engine's usage; TTFT = call to first text chunk,
over all turns and over follow-up turns only (a first turn is a full
prefill whatever the routing; with few turns they fill the top 5%).

`--engine sim` (default): the simulated engine with a prefill cost per
uncached prompt token (one prefill at a time per replica, like a
compute-bound engine) and a decode rate, so cache misses cost time as on a
real engine. `--engine vllm`: the embedded SmolLM2-135M of
serve_apps/configs/local.yaml on vLLM CPU (build the catalog first:
`python -m serve_apps.catalog.build`; two replicas need ~10 GB of RAM).

Cold start: a deployment with `min_replicas: 0`, time from the first call at
zero replicas to its first token (Ray starting the replica, the engine
loading, the prefill), the same path the gateway waits on before admission.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import emit_json, machine, percentile, print_table
from serve_apps.cli.serve_main import DEFAULT_CONFIG
from serve_apps.config import AppConfig, ConfigError, ModelConfig, load_config
from serve_apps.deploy import ray_env
from serve_apps.engines.sim import SIM_CARDS, SIM_LARGE
from serve_apps.engines.types import ChatMessage, GenerationRequest, SamplingParams

SYSTEM = ("You are a senior engineer on the storage team. Answer precisely, cite the subsystem by name, "
          "and keep a friendly tone. ") * 3
VLLM_MODEL = "hf:HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass
class Result:
    variant: str
    replicas: int
    ttft_s: list[float] = field(default_factory=list)
    followup_ttft_s: list[float] = field(default_factory=list)  # turns after the first: what routing can change
    cached: int = 0
    prompt: int = 0
    wall_s: float = 0.0
    shares: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"variant": self.variant, "replicas": self.replicas, "requests": len(self.ttft_s),
                "hit_ratio": round(self.cached / self.prompt, 4) if self.prompt else 0.0,
                "ttft_p50_ms": round(percentile(self.ttft_s, 50) * 1000, 1),
                "ttft_p95_ms": round(percentile(self.ttft_s, 95) * 1000, 1),
                "followup_ttft_p50_ms": round(percentile(self.followup_ttft_s, 50) * 1000, 1),
                "followup_ttft_p95_ms": round(percentile(self.followup_ttft_s, 95) * 1000, 1),
                "wall_s": round(self.wall_s, 2), "max_replica_share": round(max(self.shares), 3)}


def model_config(args: argparse.Namespace, routing: str, replicas: int, *,
                 min_replicas: int | None = None) -> AppConfig:
    """The one-model config a variant deploys."""
    scaling = {"min_replicas": replicas if min_replicas is None else min_replicas, "max_replicas": replicas,
               "target_ongoing_requests": args.concurrency, "upscale_delay_s": 0}
    if args.engine == "sim":
        large = next(c for c in SIM_CARDS if c.id == SIM_LARGE)
        return AppConfig.model_validate({
            "engine": "sim",
            "sim": {"tokens_per_s": args.tokens_per_s, "prefill_ms_per_uncached_token": args.prefill_ms_per_token,
                    "start_s": args.sim_start_s},
            "models": [{"id": SIM_LARGE, "features": list(large.features), "routing": routing,
                        "affinity_max_queue": args.affinity_max_queue, "resources": {"num_cpus": 0.25},
                        "max_ongoing_requests": 64, "autoscaling": scaling}]})
    local = load_config(DEFAULT_CONFIG)
    chat: ModelConfig = next(m for m in local.models if m.id == VLLM_MODEL)
    chat = chat.model_copy(update={"routing": routing, "affinity_max_queue": args.affinity_max_queue,
                                   "autoscaling": chat.autoscaling.model_copy(update=scaling)})
    store = local.store.model_copy(update={"data_dir": args.data_dir}) if args.data_dir else local.store
    return local.model_copy(update={"models": (chat,), "store": store})


def model_id(args: argparse.Namespace) -> str:
    return SIM_LARGE if args.engine == "sim" else VLLM_MODEL


def session_context(conversation: int, chars: int) -> str:
    """A coding agent's session context: `chars` characters of code only this conversation carries.

    With it, a turn routed away from the replica holding its conversation
    pays a real prefill for the whole context, as an agent session does.
    """
    if chars <= 0:
        return ""
    lines: list[str] = []
    size = 0
    i = 0
    while size < chars:
        line = (f"def evict_{conversation}_{i}(cache, block):\n"
                f"    slot = (block.id * {conversation * 31 + i + 7}) % {512 + conversation}\n"
                f"    return cache.pop(slot, None)\n")
        lines.append(line)
        size += len(line)
        i += 1
    return "Here is the module we are discussing:\n" + "".join(lines)[:chars] + "\n"


async def run_workload(handle: Any, args: argparse.Namespace, result: Result) -> None:
    from serve_apps.deploy.engine_proxy import DeploymentEngine
    from serve_apps.deploy.serving_plan import cards

    mid = model_id(args)
    engine = DeploymentEngine(handle, [cards(model_config(args, "default", 1))[mid]])
    histories = [[ChatMessage("system", SYSTEM),
                  ChatMessage("user", f"Conversation {c}: {session_context(c, args.context_chars)}how does "
                                      f"subsystem {c} decide which blocks to evict when the cache is full? "
                                      f"Walk me through it. ")]
                 for c in range(args.conversations)]
    turns_done = [0] * args.conversations
    pending: asyncio.Queue[int] = asyncio.Queue()
    for c in range(args.conversations):
        pending.put_nowait(c)

    async def worker() -> None:
        while True:
            try:
                c = pending.get_nowait()
            except asyncio.QueueEmpty:
                return
            t = turns_done[c]
            request = GenerationRequest(request_id=f"{result.variant}-c{c}-t{t}", model=mid,
                                        sampling=SamplingParams(max_tokens=args.max_tokens, temperature=0, seed=c),
                                        messages=tuple(histories[c]))
            started = time.perf_counter()
            first: float | None = None
            text = ""
            usage = None
            async for chunk in engine.generate(request):
                if first is None and chunk.text:
                    first = time.perf_counter() - started
                text += chunk.text
                usage = chunk.usage or usage
            result.ttft_s.append(first if first is not None else time.perf_counter() - started)
            if t > 0:
                result.followup_ttft_s.append(result.ttft_s[-1])
            if usage is not None:
                result.cached += usage.cached_tokens
                result.prompt += usage.prompt_tokens
            histories[c] += [ChatMessage("assistant", text),
                             ChatMessage("user", f"Turn {t + 1}: and what if two writers race on subsystem {c}'s "
                                                 f"eviction list? ")]
            turns_done[c] += 1
            if turns_done[c] < args.turns:
                pending.put_nowait(c)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    result.wall_s = time.perf_counter() - started


def warm_all(handle: Any, replicas: int, timeout_s: float) -> None:
    """Load the engine on every replica before measuring (vLLM loads on a replica's first call).

    `ready()` reaches whichever replica the router picks, so send bursts of
    them until a burst answers at once: then no replica is still loading.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = time.monotonic()
        calls = [handle.ready.remote() for _ in range(2 * replicas)]
        for call in calls:
            call.result(timeout_s=timeout_s)
        if time.monotonic() - started < 0.5:
            return
    raise RuntimeError(f"replicas still loading after {timeout_s:g} s")


def replica_started(handle: Any, replicas: int) -> dict[str, int]:
    """Generations each replica started (`stats` answers from whichever replica it is routed to)."""
    seen: dict[str, int] = {}
    for _ in range(500):
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["replica"]] = stats["started"]
        if len(seen) == replicas:
            return seen
    raise RuntimeError(f"only {len(seen)} of {replicas} replicas answered stats()")


def measure(args: argparse.Namespace, variant: str, routing: str, replicas: int) -> Result:
    from ray import serve

    from serve_apps.deploy.ray_app import model_deployment
    from serve_apps.deploy.serving_plan import plan

    config = model_config(args, routing, replicas)
    (p,) = plan(config)
    app = f"bench-routing-{variant}"
    handle = serve.run(model_deployment(p, config), name=app, route_prefix=None, blocking=False)
    try:
        warm_all(handle, replicas, args.ready_timeout_s)
        before = replica_started(handle, replicas)
        result = Result(variant, replicas)
        asyncio.run(run_workload(handle, args, result))
        after = replica_started(handle, replicas)
        served = [after[r] - before[r] for r in after]
        result.shares = [n / max(sum(served), 1) for n in served]
        return result
    finally:
        serve.delete(app)


def cold_start(args: argparse.Namespace) -> float:
    """Seconds from the first call at zero replicas to its first token."""
    from ray import serve

    from serve_apps.deploy.engine_proxy import DeploymentEngine
    from serve_apps.deploy.ray_app import model_deployment
    from serve_apps.deploy.serving_plan import cards, deployment_name, plan

    config = model_config(args, "affinity", 1, min_replicas=0)
    (p,) = plan(config)
    app = "bench-routing-cold"
    handle = serve.run(model_deployment(p, config), name=app, route_prefix=None, blocking=False)
    try:
        status = serve.status().applications[app].deployments[deployment_name(model_id(args))]
        running = sum(n for s, n in status.replica_states.items() if s == "RUNNING")
        if running:
            raise RuntimeError(f"{app}: expected zero replicas before the cold start, found {running}")
        mid = model_id(args)
        engine = DeploymentEngine(handle, [cards(config)[mid]])
        request = GenerationRequest(request_id="cold", model=mid, sampling=SamplingParams(max_tokens=8),
                                    messages=(ChatMessage("user", "Are you awake?"),))

        async def first_token() -> float:
            started = time.perf_counter()
            async for chunk in engine.generate(request):
                if chunk.text:
                    break
            return time.perf_counter() - started

        return asyncio.run(first_token())
    finally:
        serve.delete(app)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engine", choices=("sim", "vllm"), default="sim")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--context-chars", type=int, default=0,
                        help="code each conversation carries in its first message (an agent session's context)")
    parser.add_argument("--affinity-max-queue", type=int, default=8)
    parser.add_argument("--prefill-ms-per-token", type=float, default=1.0, help="sim: per uncached prompt token")
    parser.add_argument("--tokens-per-s", type=float, default=100.0, help="sim: decode rate per stream")
    parser.add_argument("--sim-start-s", type=float, default=0.0, help="sim: simulated engine load at start")
    parser.add_argument("--data-dir", type=Path, default=None, help="vllm: where the embedded catalog was built")
    parser.add_argument("--ready-timeout-s", type=float, default=600.0)
    parser.add_argument("--json", action="store_true", help="also print one JSON object on the last line")
    args = parser.parse_args()

    from ray import serve

    if args.engine == "vllm":
        from serve_apps.deploy.model_server import resolve_model_dir

        try:
            config = model_config(args, "affinity", 2)
            resolve_model_dir(config.models[0].vllm.model if config.models[0].vllm else "", config)
        except ConfigError as exc:
            raise SystemExit(f"bench/routing.py: {exc}") from None

    local_ray = ray_env.init_local(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(logging_config={"enable_access_log": False})
        results = [measure(args, "affinity", "affinity", 2), measure(args, "default", "default", 2),
                   measure(args, "single", "affinity", 1)]
        cold_s = cold_start(args)
    finally:
        serve.shutdown()  # type: ignore[no-untyped-call]
        ray_env.shutdown_local(local_ray)

    rows = [r.row() for r in results]
    by = {r["variant"]: r for r in rows}
    keep = by["affinity"]["hit_ratio"] / by["single"]["hit_ratio"] if by["single"]["hit_ratio"] else 0.0
    title = (f"Routing on the {args.engine} engine ({machine()}): {args.conversations} conversations × "
             f"{args.turns} turns, {args.concurrency} concurrent, {args.max_tokens} output tokens")
    print_table(title, rows, ["variant", "replicas", "requests", "hit_ratio", "ttft_p50_ms", "ttft_p95_ms",
                              "followup_ttft_p50_ms", "followup_ttft_p95_ms", "wall_s", "max_replica_share"])
    summary = {"affinity_hit_ratio_vs_single": round(keep, 3),
               "affinity_vs_default_p95_ttft": round(by["affinity"]["ttft_p95_ms"] / by["default"]["ttft_p95_ms"], 3),
               "affinity_vs_default_followup_p95_ttft": round(
                   by["affinity"]["followup_ttft_p95_ms"] / by["default"]["followup_ttft_p95_ms"], 3),
               "cold_start_to_first_token_s": round(cold_s, 2)}
    # First turns are a full prefill under any routing; with few turns per
    # conversation they make up the top 5% on their own, so the follow-up
    # turns' p95 is printed beside the overall one.
    print_table("Targets: hit ratio vs single >= 0.9, affinity p95 TTFT below default's",
                [summary], list(summary))
    workload: dict[str, Any] = {"conversations": args.conversations, "turns": args.turns,
                                "concurrency": args.concurrency, "max_tokens": args.max_tokens,
                                "context_chars": args.context_chars}
    if args.engine == "sim":
        workload.update(prefill_ms_per_token=args.prefill_ms_per_token, tokens_per_s=args.tokens_per_s)
    if args.json:
        emit_json({"benchmark": "routing", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": machine(), "engine": args.engine,
                   "workload": workload,
                   "variants": by, **summary})


if __name__ == "__main__":
    main()
