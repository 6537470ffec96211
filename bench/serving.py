"""Serving: time to first token and output tokens/s, packserve on Ray Serve vs vLLM's own OpenAI server.

Rerun (from the repository root; the first run converts the embedded models, ~30 s):

    .venv/bin/python bench/serving.py [--json]
    .venv/bin/python bench/serving.py --concurrency 1,4,16 --requests-per-stream 4 --min-requests 8 \\
        --max-tokens 64 --rounds 2 [--data-dir DIR] [--json]

Both targets serve the embedded SmolLM2-135M-Instruct (the `builtin:` model
of serve_apps/configs/local.yaml) on CPU with the same engine settings
(eager mode, 2048-token context, 2 GiB KV cache, 16 sequences, prefix
caching on), one after the other, never both at once (a 2-core machine
cannot hold two engines without each slowing the other):

(a) packserve  `build_app(local.yaml)` with its chat model alone (see
               `packserve_config`) on Ray Serve started in this process,
               Redis started here (bench/common.py `redis_server()`):
               HAProxy (Ray Serve's throughput mode, serve_apps/deploy/ray_env.py)
               → the gateway deployment (API key auth,
               admission against Redis, metering) → the model deployment's
               `VllmEngine` (vLLM's `AsyncLLM`) through a DeploymentHandle.
               One account per stream (one standard pack: concurrency 2 on
               a small model, a 500-request bar where this model weighs
               0.09), so no request waits for a slot or a bar.
(b) vllm       `python -m vllm.entrypoints.openai.api_server` on the same
               converted model directory, with the flags derived from
               local.yaml's `vllm` section for the model (`vllm_args`:
               `VLLM_CPU_KVCACHE_SPACE=2`, `--enforce-eager`,
               `--max-model-len 2048`, `--max-num-seqs 16`, LoRA enabled
               when local.yaml enables it) plus
               `--enable-prompt-tokens-details`.

Each round measures both targets, one after the other; the order alternates
between rounds, and every figure pools the samples of all rounds (a level's
throughput is its tokens over its wall time, summed over rounds; the
per-round figures are printed beside it). One round of a few dozen requests
moves by about ±5%, and at 16 streams the TTFT of a request depends on which
engine step it lands in (closed-loop streams drift apart, so first tokens
cluster around step boundaries ~400 ms apart). Pooling rounds steadies the
figures, but at 16 streams the p50 TTFT of two-round runs still differed by
up to ~100 ms (bench/RESULTS.md): compare several runs before concluding.

Every level sends the same requests to both, in the same order: chat
completions with `stream: true` and `stream_options.include_usage`,
temperature 0, `max_tokens` fixed, prompts that make the model write at
length (so almost every answer is exactly max_tokens long); each target gets
one warm-up request first. Streams are closed loops (each sends its next
request when the previous one ends). TTFT is client-side, from just before
the request is sent to the first SSE event with non-empty content. Output
tokens/s is the level's total completion tokens (from `usage`) divided by
its wall time: the throughput the server delivers.

Placement (`--no-split`, `--pin-vllm`): packserve starts its Ray as `packserve
serve` does for local.yaml, with the CPU split of serve_apps/host/cpu_split.py
(vLLM's OpenMP threads on the engine CPUs, every other process of packserve on
the rest). vLLM's server runs as it ships: on every CPU, with its own auto
binding of its OpenMP threads (which picks the same engine CPUs);
`--pin-vllm` runs it split the same way instead, as an operator would with
`taskset`. The load generator (this process) and Redis are clients: they keep
to the serving CPUs for both targets, as a client on another machine would
stay off the engine's cores. `--no-split` restores the earlier setup
(nothing pinned, load generator anywhere).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx

from bench.common import (
    emit_json,
    free_port,
    machine,
    median_interval,
    percentile,
    print_table,
    process,
    redis_server,
)
from bench.gateway import Sample, Target, one_stream, wait_http
from serve_apps.deploy.ray_env import OMP_BIND, engine_cpu_split
from serve_apps.engines.vllm.engine import VLLM_ENV_DEFAULTS
from serve_apps.host.cpu_split import CpuSplit, id_list

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONFIG = ROOT / "serve_apps" / "configs" / "local.yaml"
RATIO_TARGET = 0.95  # packserve's throughput as a share of vLLM's own server
TTFT_TARGET_MS = 10.0  # p50 time to first token packserve may add
VERDICT_CONFIDENCE = 0.9
START_TIMEOUT_S = 900.0  # a first vLLM start on a loaded 2-core machine can take minutes
PROMPTS = (
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in detail how a steam engine works, step by step.",
    "Write a long letter to a friend describing a trip through the mountains.",
    "Describe the history of the bicycle in as much detail as you can.",
    "Write a long fairy tale about a fox, a crow and a river.",
    "Explain how bread is made, from growing wheat to baking the loaf.",
    "Write a detailed travel guide to a small coastal town.",
    "Describe a day in the life of a medieval blacksmith, in detail.",
)


def log(message: str) -> None:
    print(f"[serving] {message}", file=sys.stderr, flush=True)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"load average {os.getloadavg()}"


# ----------------------------------------------------------------- load


def request_body(n: int, max_tokens: int) -> dict[str, Any]:
    """Request n of a level: a streamed, greedy chat completion of PROMPTS[n % len(PROMPTS)]."""
    return {"messages": [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": max_tokens, "temperature": 0}


async def run_level(client: httpx.AsyncClient, target: Target, streams: int, requests: int,
                    max_tokens: int) -> tuple[list[Sample], float]:
    """`streams` closed-loop workers send `requests` requests (prompt i of the level: PROMPTS[i % n])."""
    samples: list[Sample] = []
    queue = list(range(requests))

    async def worker(i: int) -> None:
        key = target.keys[i % len(target.keys)]
        while queue:
            n = queue.pop(0)
            samples.append(await one_stream(client, target, key, request_body(n, max_tokens)))

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(streams)))
    return samples, time.perf_counter() - started


def summarize(target: str, streams: int, levels: Sequence[tuple[list[Sample], float]]) -> dict[str, Any]:
    """One row from every round of one (target, streams) level: samples pooled, throughput over all walls."""
    samples = [s for level, _ in levels for s in level]
    wall_s = sum(wall for _, wall in levels)
    good = [s for s in samples if s.ok]
    ttft = [s.ttft_s * 1000 for s in good]
    decoded = [s for s in good if s.tokens > 1]
    decode_s = sum(s.decode_s for s in decoded)
    errors = [s.error for s in samples if not s.ok]
    tokens = sum(s.tokens for s in good)
    row: dict[str, Any] = {
        "target": target,
        "streams": streams,
        "rounds": len(levels),
        "requests": len(samples),
        "errors": len(errors),
        "ttft_p50_ms": round(percentile(ttft, 50), 1),
        "ttft_mean_ms": round(sum(ttft) / len(ttft), 1) if ttft else float("nan"),
        "ttft_p99_ms": round(percentile(ttft, 99), 1),
        "output_tok_s": round(tokens / wall_s, 1) if wall_s > 0 else float("nan"),
        # Per round, to show how much one run moves.
        "round_tok_s": [round(sum(s.tokens for s in level if s.ok) / wall, 1) for level, wall in levels if wall > 0],
        "round_ttft_p50_ms": [round(percentile([s.ttft_s * 1000 for s in level if s.ok], 50), 1)
                              for level, _ in levels],
        # What one client sees while its answer streams (sum of tokens / sum of decode times).
        "tok_s_per_stream": round(sum(s.tokens - 1 for s in decoded) / decode_s, 1) if decode_s > 0 else float("nan"),
        "mean_output_tokens": round(tokens / len(good), 1) if good else 0.0,
    }
    if errors:
        row["first_error"] = errors[0]
    return row


Levels = dict[int, tuple[list[Sample], float]]


async def measure(name: str, target: Target, levels: Sequence[int], args: argparse.Namespace) -> Levels:
    """Each level's samples and wall time, after one warm-up request."""
    out: Levels = {}
    limits = httpx.Limits(max_connections=max(levels) * 2, max_keepalive_connections=max(levels) * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        log(f"{name}: warm-up request")
        warm = await one_stream(client, target, target.keys[0], request_body(0, args.max_tokens))
        if not warm.ok:
            raise SystemExit(f"{name}: the warm-up request failed: {warm.error}")
        for streams in levels:
            requests = max(args.min_requests, streams * args.requests_per_stream)
            log(f"{name}: {streams} concurrent streams, {requests} requests of {args.max_tokens} tokens")
            samples, wall = await run_level(client, target, streams, requests, args.max_tokens)
            out[streams] = (samples, wall)
            row = summarize(name, streams, [(samples, wall)])
            log(f"{name}: {streams} streams: TTFT p50 {row['ttft_p50_ms']} ms, "
                f"{row['output_tok_s']} output tokens/s, {row['errors']} errors")
    return out


# ----------------------------------------------------------------- targets


def packserve_config(model_data_dir: Path, redis_url: str, port: int, with_embeddings: bool = False) -> Any:
    """local.yaml with a Redis store, this run's port, no demo account, and the measured chat model alone.

    Both targets serve the same one model: vLLM's server gets neither the
    LoRA adapters (trained at catalog build time, minutes of CPU) nor the
    embeddings model, so packserve does not deploy them either (an idle
    embeddings replica with its vLLM engine costs ~0.3 CPU-s per 30 s on
    its own, bench/RESULTS.md); `with_embeddings` deploys it anyway, as
    `make run` does. The chat model keeps local.yaml's engine settings,
    which `vllm_args` passes to vLLM's own server as well.
    """
    from serve_apps.config import AppConfig, load_config

    raw: dict[str, Any] = load_config(LOCAL_CONFIG).model_dump(mode="json")
    raw["store"] = {"redis_url": redis_url, "data_dir": str(model_data_dir)}
    raw["gateway"]["port"] = port
    raw["demo_account"] = False
    kinds = ("chat", "embeddings") if with_embeddings else ("chat",)
    raw["models"] = [m for m in raw["models"] if m["kind"] in kinds]
    return AppConfig.model_validate(raw)


def vllm_args(model_id: str) -> tuple[list[str], dict[str, str]]:
    """vLLM OpenAI-server flags and environment equal to local.yaml's engine settings for `model_id`."""
    from serve_apps.config import load_config

    model = next(m for m in load_config(LOCAL_CONFIG).models if m.id == model_id)
    v = model.vllm
    assert v is not None, f"{model_id} has no vllm section in {LOCAL_CONFIG}"
    flags = ["--dtype", v.dtype, "--max-num-seqs", str(v.max_num_seqs), "--enable-prefix-caching"]
    if v.max_model_len is not None:
        flags += ["--max-model-len", str(v.max_model_len)]
    if v.enforce_eager:
        flags.append("--enforce-eager")
    if v.max_num_batched_tokens is not None:
        flags += ["--max-num-batched-tokens", str(v.max_num_batched_tokens)]
    if v.enable_lora:
        flags += ["--enable-lora", "--max-lora-rank", str(v.max_lora_rank), "--max-loras", str(v.max_loras)]
    env = {"VLLM_CPU_KVCACHE_SPACE": f"{v.kv_cache_space_gib:g}"} if v.kv_cache_space_gib else {}
    return flags, env


@contextmanager
def packserve(data_dir: Path, redis_url: str, streams: int, with_embeddings: bool = False,
              cpus: CpuSplit | None = None) -> Iterator[Target]:
    """build_app(local.yaml) on a Ray started here (on `cpus`, as `packserve serve` starts it), stopped at the end."""
    from ray import serve

    from serve_apps.catalog.build import SMOLLM_ID
    from serve_apps.deploy import ray_env
    from serve_apps.deploy.ray_app import APP_NAME, build_app
    from serve_apps.deploy.serving_plan import deployment_name

    port = free_port()
    admin_token = secrets.token_urlsafe(16)
    config = packserve_config(data_dir, redis_url, port, with_embeddings)
    log(f"packserve: starting Ray ({os.cpu_count()} CPUs) and Serve on port {port}")
    started = time.monotonic()
    local_ray = ray_env.init_local(cpus, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"enable_access_log": False})
        serve.run(build_app(config, admin_token=admin_token), name=APP_NAME, route_prefix="/", blocking=False)
        log("packserve: deployed; waiting for the vLLM engine to start (~40 s)")
        handle = serve.get_deployment_handle(deployment_name(SMOLLM_ID), app_name=APP_NAME)
        handle.ready.remote().result(timeout_s=START_TIMEOUT_S)
        # Its router would flush metrics 10 times a second in this process,
        # the load generator, for the whole run (serve_main does the same).
        handle.shutdown()  # type: ignore[no-untyped-call]
        base = f"http://127.0.0.1:{port}"
        keys = asyncio.run(create_accounts_one_pack(base, admin_token, streams))
        log(f"packserve: ready in {time.monotonic() - started:.0f} s")
        yield Target("packserve", f"{base}/v1/chat/completions", SMOLLM_ID, keys)
    finally:
        log("packserve: stopping Ray")
        try:
            serve.shutdown()  # type: ignore[no-untyped-call]
        finally:
            ray_env.shutdown_local(local_ray)


async def create_accounts_one_pack(base: str, admin_token: str, n: int) -> list[str]:
    """One account per stream with one standard pack (what a customer has), not bench/gateway.py's five."""
    headers = {"authorization": f"Bearer {admin_token}"}
    keys: list[str] = []
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30) as client:
        for i in range(n):
            r = await client.post("/admin/v1/accounts",
                                  json={"name": f"bench-serving-{i}", "plan": "subscription", "packs": ["standard"]})
            r.raise_for_status()
            k = await client.post(f"/admin/v1/accounts/{r.json()['id']}/keys")
            k.raise_for_status()
            keys.append(str(k.json()["key"]))
    return keys


@contextmanager
def vllm_server(model_dir: Path, model_id: str, cpus: Collection[int] | None = None,
                extra_env: dict[str, str] | None = None) -> Iterator[Target]:
    """vLLM's own OpenAI server with local.yaml's engine settings, in its own process group, on `cpus`."""
    port = free_port()
    flags, engine_env = vllm_args(model_id)
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", model_id, "--host", "127.0.0.1", "--port", str(port),
            "--enable-prompt-tokens-details", "--disable-log-stats", *flags]
    env = {**VLLM_ENV_DEFAULTS, **engine_env, **(extra_env or {})}
    log(f"vllm: starting its OpenAI server on port {port} (~40 s): {' '.join(argv[3:])}")
    started = time.monotonic()
    with process("vllm", argv, env=env, cpus=cpus) as proc:
        wait_http(f"http://127.0.0.1:{port}/v1/models", proc, "vLLM's OpenAI server", START_TIMEOUT_S)
        log(f"vllm: ready in {time.monotonic() - started:.0f} s")
        yield Target("vllm", f"http://127.0.0.1:{port}/v1/chat/completions", model_id, ["unused"],
                     {"session": proc.pid})
        log("vllm: stopping")


# ----------------------------------------------------------------- report


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per level: packserve's throughput as a share of vLLM's, and the TTFT packserve adds (p50 and mean)."""
    by = {(r["target"], r["streams"]): r for r in rows}
    out: list[dict[str, Any]] = []
    for (target, streams), ours in sorted(by.items(), key=lambda kv: kv[0][1]):
        theirs = by.get(("vllm", streams))
        if target != "packserve" or theirs is None:
            continue
        share = ours["output_tok_s"] / theirs["output_tok_s"] if theirs["output_tok_s"] else float("nan")
        per_round = [round(a / b, 3) for a, b in zip(ours["round_tok_s"], theirs["round_tok_s"], strict=False) if b]
        # Round n of both targets ran back to back: each difference compares the machine with itself.
        added_per_round = [round(a - b, 1) for a, b in
                           zip(ours["round_ttft_p50_ms"], theirs["round_ttft_p50_ms"], strict=False)]
        row: dict[str, Any] = {
            "streams": streams, "throughput_ratio": round(share, 3), "round_ratios": per_round,
            "added_ttft_p50_ms": round(ours["ttft_p50_ms"] - theirs["ttft_p50_ms"], 1),
            "round_added_p50_ms": added_per_round,
            "added_ttft_mean_ms": round(ours["ttft_mean_ms"] - theirs["ttft_mean_ms"], 1)}
        row.update(round_verdict(per_round, added_per_round))
        out.append(row)
    return out


def round_verdict(round_ratios: Sequence[float], round_added_ms: Sequence[float]) -> dict[str, Any]:
    """What the rounds show about the targets, given how much they scatter.

    The median round and a 90% sign-test interval for each figure
    (bench.common.median_interval): "met" when the whole interval is inside
    both targets, "missed" when either interval is wholly outside, else
    "undecided" (the machine's scatter is wider than the margin); with fewer
    than 5 rounds no interval reaches 90%: "too few rounds".
    """
    ratio = median_interval(round_ratios, VERDICT_CONFIDENCE)
    added = median_interval(round_added_ms, VERDICT_CONFIDENCE)
    if ratio is None or added is None:
        return {}
    if min(ratio.coverage, added.coverage) < VERDICT_CONFIDENCE:
        verdict = "too few rounds"
    elif added.high < TTFT_TARGET_MS and ratio.low >= RATIO_TARGET:
        verdict = "met"
    elif added.low >= TTFT_TARGET_MS or ratio.high < RATIO_TARGET:
        verdict = "missed"
    else:
        verdict = "undecided"
    return {"round_ratio_median": round(ratio.median, 3), "round_ratio_interval": [ratio.low, ratio.high],
            "round_added_median_ms": round(added.median, 1), "round_added_interval_ms": [added.low, added.high],
            "interval_coverage": min(ratio.coverage, added.coverage), "verdict": verdict}


def print_verdicts(what: str, compared: list[dict[str, Any]]) -> None:
    """The table of `round_verdict` figures, one row per level."""
    print_table(f"{what}, sign-test interval of the median (coverage), verdict", compared,
                ["streams", "round_ratio_median", "round_ratio_interval", "round_added_median_ms",
                 "round_added_interval_ms", "interval_coverage", "verdict"])


def run_rounds(args: argparse.Namespace, levels: list[int], data_dir: Path, model_dir: Path,
               placement: Placement) -> list[dict[str, Any]]:
    """`args.rounds` rounds, each measuring both targets; the order alternates so neither always goes first."""
    from serve_apps.catalog.build import SMOLLM_ID

    results: dict[tuple[str, int], list[tuple[list[Sample], float]]] = {}

    def keep(name: str, measured: Levels) -> None:
        for streams, level in measured.items():
            results.setdefault((name, streams), []).append(level)

    with redis_server() as redis_url:
        for n in range(args.rounds):
            order = ("packserve", "vllm") if n % 2 == 0 else ("vllm", "packserve")
            log(f"round {n + 1} of {args.rounds}: {order[0]} first")
            for name in order:
                if name == "packserve":
                    with packserve(data_dir, redis_url, max(levels), args.with_embeddings,
                                   placement.split) as target:
                        keep(name, asyncio.run(measure(name, target, levels, args)))
                else:
                    with vllm_server(model_dir, SMOLLM_ID, placement.vllm_cpus, placement.vllm_env) as target:
                        keep(name, asyncio.run(measure(name, target, levels, args)))
    rows = [summarize(name, streams, measured) for (name, streams), measured in results.items()]
    rows.sort(key=lambda r: (r["streams"], r["target"] != "vllm"))
    return rows


@dataclass(frozen=True)
class Placement:
    """Which CPUs each side runs on (see the module doc)."""

    split: CpuSplit | None  # packserve's, as `packserve serve` computes it; None: no split
    vllm_cpus: frozenset[int]  # vLLM's server: all CPUs as shipped, or the serving CPUs with --pin-vllm
    vllm_env: dict[str, str]  # with --pin-vllm: its OpenMP threads on the engine CPUs
    client_cpus: frozenset[int]  # this process (the load generator) and Redis

    def describe(self) -> str:
        if self.split is None:
            return "no CPU split: every process may run on every CPU"
        return (f"packserve: vLLM on CPU {id_list(self.split.engine)}, the rest on {id_list(self.split.serving)}; "
                f"vLLM's server on CPU {id_list(self.vllm_cpus)}"
                f"{' (OpenMP on ' + self.vllm_env[OMP_BIND] + ')' if self.vllm_env else ' (its own binding)'}; "
                f"load generator and Redis on {id_list(self.client_cpus)}")


def placement(no_split: bool, pin_vllm: bool) -> Placement:
    everything = frozenset(os.sched_getaffinity(0))
    split = None if no_split else engine_cpu_split()
    if split is None:
        return Placement(None, everything, {}, everything)
    serving = frozenset(split.serving)
    return Placement(split, serving if pin_vllm else everything,
                     {OMP_BIND: id_list(split.engine)} if pin_vllm else {}, serving)


def add_load_arguments(parser: argparse.ArgumentParser, rounds_help: str) -> None:
    """The load and model arguments bench/serving.py and bench/ray_floor.py share."""
    parser.add_argument("--concurrency", default="1,4,16", help="comma-separated stream counts")
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help=rounds_help)
    parser.add_argument("--min-requests", type=int, default=8, help="at least this many requests per level")
    parser.add_argument("--max-tokens", type=int, default=64)
    add_model_output_arguments(parser)


def add_model_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--data-dir` (read by `embedded_models`) and `--json`, as every benchmark of the embedded model takes them."""
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where the embedded models are built (default: PACKSERVE_DATA_DIR or ~/.local/share)")
    parser.add_argument("--json", action="store_true", help="also print one JSON object on the last line")


def embedded_models(args: argparse.Namespace, catalog_ids: Sequence[str]) -> tuple[Path, Path]:
    """The data directory and SmolLM2's converted directory, building `catalog_ids` first if needed."""
    from cluster.settings import default_data_dir
    from serve_apps.catalog.build import EMBEDDED_MODELS, SMOLLM_ID, build_catalog

    data_dir: Path = args.data_dir or default_data_dir()
    log(f"building (or reusing) {', '.join(catalog_ids)} in {data_dir}/models")
    built = build_catalog(data_dir, progress=True, models=[m for m in EMBEDDED_MODELS if m.catalog_id in catalog_ids])
    return data_dir, built[SMOLLM_ID]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, rounds_help="measure both targets this many times (order alternating) and pool "
                                           "the samples")
    parser.add_argument("--with-embeddings", action="store_true",
                        help="packserve also deploys local.yaml's embeddings model, as `make run` does")
    parser.add_argument("--no-split", action="store_true",
                        help="start packserve's Ray without the CPU split (and leave the load generator anywhere)")
    parser.add_argument("--pin-vllm", action="store_true",
                        help="also run vLLM's server split the same way (taskset-style), not as it ships")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    from serve_apps.catalog.build import MINILM_ID, SMOLLM_ID

    data_dir, model_dir = embedded_models(args, (SMOLLM_ID, MINILM_ID))
    where = placement(args.no_split, args.pin_vllm)
    log(f"placement: {where.describe()}")
    # The load generator is a client: it keeps off the engine's CPUs, as a
    # client on another machine would, for both targets alike.
    os.sched_setaffinity(0, where.client_cpus)
    load_before = uptime()
    log(f"uptime before: {load_before}")
    rows = run_rounds(args, levels, data_dir, model_dir, where)
    load_after = uptime()
    log(f"uptime after: {load_after}")

    print_table(f"Serving SmolLM2-135M-Instruct on CPU ({machine()}), {args.max_tokens} output tokens per request",
                rows, ["target", "streams", "rounds", "requests", "errors", "ttft_p50_ms", "ttft_mean_ms",
                       "ttft_p99_ms", "output_tok_s", "round_tok_s", "tok_s_per_stream", "mean_output_tokens"])
    compared = ratios(rows)
    print_table(f"packserve vs vLLM (targets: throughput ratio >= {RATIO_TARGET}, added p50 TTFT < "
                f"{TTFT_TARGET_MS:g} ms)", compared,
                ["streams", "throughput_ratio", "round_ratios", "added_ttft_p50_ms", "round_added_p50_ms",
                 "added_ttft_mean_ms"])
    print_verdicts("The same per round: median round", compared)
    print(f"\nuptime before: {load_before}\nuptime after:  {load_after}")
    if args.json:
        emit_json({"benchmark": "serving", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": machine(), "model": SMOLLM_ID, "max_tokens": args.max_tokens, "rounds": args.rounds,
                   "with_embeddings": args.with_embeddings, "placement": where.describe(), "rows": rows,
                   "ratios": compared, "uptime_before": load_before, "uptime_after": load_after,
                   "targets": {"throughput_ratio_min": RATIO_TARGET, "added_ttft_p50_ms_max": TTFT_TARGET_MS}})


if __name__ == "__main__":  # vLLM and Ray spawn processes that re-import this module
    main()
