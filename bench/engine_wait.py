"""How vLLM's engine core waits for its CPU worker: vLLM's spin against packserve's paced sleep.

Rerun (from the repository root; the first run converts the embedded model, ~30 s):

    .venv/bin/python bench/engine_wait.py [--json]
    .venv/bin/python bench/engine_wait.py --waits spin,paced --rounds 2 --requests 12 --max-tokens 128 \\
        --gap-s 1.5 [--data-dir DIR] [--json]

On CPU, vLLM runs the model in a worker process, and its engine-core process
waits for each step's result. vLLM's executor spins on `sched_yield()`
("spin"); packserve's (serve_apps/engines/vllm/executor.py) sleeps until
shortly before the result is due and spins only from then ("paced",
serve_apps/engines/vllm/step_pacer.py). No serving stack: an `AsyncLLM` with
the engine settings of local.yaml, in a process of its own on the serving
CPUs of packserve's CPU split, its OpenMP thread on the engine CPU, one
greedy stream of `--requests` requests of `--max-tokens` tokens each
(end-of-sequence ignored), `--gap-s` idle seconds before each. The first two
requests warm up and are dropped. Per run: median time between tokens,
median time to first token, and the engine core's CPU time as a share of
the generation's wall time (spinning, it is near 100%). Runs alternate
between the waits in an order that reverses every round (spin, paced,
paced, spin, ...), so drift of the machine favours neither.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import cpu_seconds, emit_json, log, machine, print_table, session_members
from bench.serving import add_model_output_arguments, embedded_models, vllm_args
from serve_apps.deploy.ray_env import OMP_BIND, engine_cpu_split
from serve_apps.engines.vllm.engine import VLLM_ENV_DEFAULTS
from serve_apps.host.cpu_split import id_list

WAITS = ("spin", "paced")
RESULT = "ENGINE_WAIT_RESULT "
RUN_TIMEOUT_S = 900
PROMPT = "Write a long story about a lighthouse keeper named {}."


async def _child(wait: str, model_dir: str, requests: int, max_tokens: int, gap_s: float) -> dict[str, Any]:
    """One run, inside the measured process: the engine, the stream, the figures."""
    from vllm import SamplingParams
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.engine.async_llm import AsyncLLM

    from serve_apps.catalog.build import SMOLLM_ID
    from serve_apps.engines.vllm.executor import SleepingMultiprocExecutor

    # local.yaml's engine settings, as bench/serving.py gives them to vLLM's own server.
    flags, _ = vllm_args(SMOLLM_ID)
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())  # type: ignore[no-untyped-call]  # vLLM leaves it untyped
    args = AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", model_dir, "--disable-log-stats", *flags]))
    if wait == "paced":
        args = dataclasses.replace(args, distributed_executor_backend=SleepingMultiprocExecutor)
    llm = AsyncLLM.from_engine_args(args)
    core = [pid for pid, name in session_members(os.getsid(0)).items() if name.startswith("VLLM::EngineCor")]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    gaps: list[float] = []
    ttfts: list[float] = []
    core_cpu = wall = 0.0
    try:
        for r in range(requests):
            await asyncio.sleep(gap_s)
            cpu_before, started = cpu_seconds(core), time.perf_counter()
            last, times = started, []
            async for _ in llm.generate(PROMPT.format(r), params, request_id=f"r{r}"):
                now = time.perf_counter()
                times.append(now - last)
                last = now
            if r >= 2:
                ttfts.append(times[0])
                gaps.extend(times[1:])
                core_cpu += cpu_seconds(core) - cpu_before
                wall += last - started
    finally:
        llm.shutdown()
    return {"wait": wait, "tokens": len(gaps), "ms_per_token": round(statistics.median(gaps) * 1000, 2),
            "mean_ms_per_token": round(statistics.mean(gaps) * 1000, 2),
            "ttft_ms": round(statistics.median(ttfts) * 1000, 1),
            "core_cpu_share": round(core_cpu / wall, 3) if wall else None}


def run(wait: str, model_dir: Path, args: argparse.Namespace, env: dict[str, str],
        cpus: frozenset[int]) -> dict[str, Any]:
    """One run in a fresh process (its own session, on `cpus`); its figures."""
    argv = [sys.executable, __file__, "--child", wait, "--model-dir", str(model_dir), "--requests",
            str(args.requests), "--max-tokens", str(args.max_tokens), "--gap-s", str(args.gap_s)]
    done = subprocess.run(argv, env={**os.environ, **env}, capture_output=True, text=True, start_new_session=True,
                          preexec_fn=lambda: os.sched_setaffinity(0, cpus), timeout=RUN_TIMEOUT_S)
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            figures: dict[str, Any] = json.loads(line[len(RESULT):])
            return figures
    sys.stderr.write(done.stderr[-3000:])
    raise SystemExit(f"the {wait} run exited with code {done.returncode} without figures")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--waits", default=",".join(WAITS), help=f"comma-separated, of {', '.join(WAITS)}")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each wait")
    parser.add_argument("--requests", type=int, default=12, help="per run, the first two dropped")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--gap-s", type=float, default=1.5, help="idle time before each request")
    add_model_output_arguments(parser)
    parser.add_argument("--child", choices=WAITS, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        figures = asyncio.run(_child(args.child, args.model_dir, args.requests, args.max_tokens, args.gap_s))
        print(RESULT + json.dumps(figures), flush=True)
        return
    main_parent(args, parser)


def main_parent(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    waits = [w.strip() for w in args.waits.split(",") if w.strip()]
    if not waits or any(w not in WAITS for w in waits) or args.rounds < 1 or args.requests < 3:
        parser.error(f"--waits takes {', '.join(WAITS)}; --rounds >= 1; --requests >= 3")
    from serve_apps.catalog.build import SMOLLM_ID

    _, model_dir = embedded_models(args, (SMOLLM_ID,))
    split = engine_cpu_split()
    if split is None:
        parser.error("needs at least two physical cores (the engine CPU and the serving CPUs)")
    env = {**VLLM_ENV_DEFAULTS, **vllm_args(SMOLLM_ID)[1], OMP_BIND: id_list(split.engine)}
    log(f"engine on CPU {id_list(split.engine)}, engine core and this stream on {id_list(split.serving)}")
    order = [w for r in range(args.rounds) for w in (waits if r % 2 == 0 else waits[::-1])]
    rows = []
    for i, wait in enumerate(order, 1):
        started = time.monotonic()
        log(f"run {i}/{len(order)}: {wait} ({args.requests} requests of {args.max_tokens} tokens, ~40 s start-up)")
        rows.append({"run": i, **run(wait, model_dir, args, env, frozenset(split.serving))})
        log(f"  {rows[-1]['ms_per_token']} ms per token, {time.monotonic() - started:.0f} s")
    print_table(f"Engine-core wait, one greedy stream of SmolLM2-135M on CPU ({machine()}), "
                f"{args.gap_s:g} s idle before each request", rows,
                ["run", "wait", "tokens", "ms_per_token", "mean_ms_per_token", "ttft_ms", "core_cpu_share"])
    if args.json:
        emit_json({"benchmark": "engine_wait", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": machine(), "model": SMOLLM_ID, "max_tokens": args.max_tokens, "gap_s": args.gap_s,
                   "runs": rows})


if __name__ == "__main__":  # vLLM spawns processes that re-import this module
    main()
