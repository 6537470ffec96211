"""Ray's floor: what an idle Ray (and an idle packserve on it) costs vLLM's own server on the same machine.

Rerun (from the repository root; the first run converts the embedded models, ~30 s):

    .venv/bin/python bench/ray_floor.py [--json]
    .venv/bin/python bench/ray_floor.py --concurrency 1,4,16 --requests-per-stream 4 --min-requests 8 \\
        --max-tokens 64 --rounds 2 [--data-dir DIR] [--json]

bench/serving.py compares packserve with vLLM's own OpenAI server. On a small
CPU machine the engine keeps every core busy, so whatever else runs there is
taken from the engine, and packserve cannot be cheaper than the Ray it runs
on. This measures that floor directly: vLLM's own server (the same server,
flags and requests as bench/serving.py) is measured while beside it

  none       nothing runs: the other two sessions are frozen (SIGSTOP, so
             they use no CPU at all);
  ray        a bare local Ray, started the way packserve starts one
             (`ray_env.init_local`), nothing deployed, idle;
  packserve  `packserve serve` on its own Ray with the simulated engine
             (gateway, one simulated model, HAProxy, Redis; no vLLM), idle:
             packserve's whole control plane, minus the engine it would drive.

Only one of the two Ray sessions runs at a time; the other stays frozen.
Each round measures one mode; the modes cycle in an order that reverses
every cycle (none, ray, packserve, packserve, ray, none, ...), so slow drift
of the machine does not favour one mode. Figures pool all rounds of a mode.
Nothing is sent to Ray or packserve: any difference from `none` is their
idle background (timers, health checks, metrics, log tailing) taking CPU
from the engine. The last column is that background's CPU, as a share of
one core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import (
    cpu_seconds,
    emit_json,
    free_port,
    kill_session,
    machine,
    print_table,
    process,
    redis_server,
    session_members,
    signal_session,
)
from bench.gateway import SERVE_READY, Sample, ray_sim_config
from bench.serving import Levels, add_load_arguments, embedded_models, log, measure, summarize, uptime, vllm_server

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "ray", "packserve")
START_TIMEOUT_S = 300.0
SETTLE_S = 5.0  # after a thaw: timers that fell due while frozen fire at once

BARE_RAY = ("import time\n"
            "from serve_apps.deploy import ray_env\n"
            "ray_env.init_local(include_dashboard=False, log_to_driver=False)\n"
            "print('ray is up', flush=True)\n"
            "time.sleep(365 * 86400)\n")


@contextmanager
def frozen_session(name: str, argv: Sequence[str], ready: str, env: dict[str, str]) -> Iterator[int]:
    """`argv` started as the leader of a new session, once it printed `ready`, frozen; its session id."""
    log(f"{name}: starting")
    with process(name, argv, env=env, ready=ready, ready_timeout_s=START_TIMEOUT_S) as proc:
        try:
            time.sleep(SETTLE_S)  # let start-up work finish before the first freeze
            signal_session(proc.pid, signal.SIGSTOP)
            log(f"{name}: up, {len(session_members(proc.pid))} processes, frozen")
            yield proc.pid
        finally:
            # A frozen session cannot stop gracefully (SIGTERM would wait for a thaw): kill it outright.
            kill_session(proc.pid)


def schedule(rounds: int) -> list[str]:
    """`rounds` rounds of every mode: none, ray, packserve, then the reverse, and so on."""
    out: list[str] = []
    for n in range(rounds):
        out += MODES if n % 2 == 0 else MODES[::-1]
    return out


def floor_rows(by_mode: dict[str, dict[int, list[tuple[list[Sample], float]]]],
               cpu: dict[str, list[tuple[float, float]]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per (mode, streams): the pooled row; and per mode and level: throughput ratio and added TTFT against none."""
    rows: list[dict[str, Any]] = []
    for mode, levels in by_mode.items():
        used = sum(c for c, _ in cpu[mode])
        wall = sum(w for _, w in cpu[mode])
        for streams, measured in sorted(levels.items()):
            row = summarize(mode, streams, measured)
            row["background_core_pct"] = round(100 * used / wall, 1) if wall else float("nan")
            rows.append(row)
    base = {r["streams"]: r for r in rows if r["target"] == "none"}
    compared = []
    for r in rows:
        ref = base.get(r["streams"])
        if r["target"] == "none" or ref is None:
            continue
        compared.append({"mode": r["target"], "streams": r["streams"],
                         "throughput_ratio": round(r["output_tok_s"] / ref["output_tok_s"], 3),
                         "added_ttft_p50_ms": round(r["ttft_p50_ms"] - ref["ttft_p50_ms"], 1),
                         "added_ttft_mean_ms": round(r["ttft_mean_ms"] - ref["ttft_mean_ms"], 1),
                         "background_core_pct": r["background_core_pct"]})
    return rows, compared


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser, rounds_help="rounds of each mode")
    args = parser.parse_args()
    levels = [int(x) for x in args.concurrency.split(",") if x.strip()]

    from serve_apps.catalog.build import SMOLLM_ID

    _, model_dir = embedded_models(args, (SMOLLM_ID,))
    load_before = uptime()
    log(f"uptime before: {load_before}")

    by_mode: dict[str, dict[int, list[tuple[list[Sample], float]]]] = {m: {} for m in MODES}
    cpu: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
    with ExitStack() as stack:
        redis_url = stack.enter_context(redis_server())
        sim_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-floor-")))
        config = sim_dir / "sim.yaml"
        # What bench/serving.py deploys (a gateway and one chat model on Redis), with the simulated engine.
        config.write_text(json.dumps(ray_sim_config(redis_url, sim_dir, free_port(), ttft_ms=0, tokens_per_s=0)))
        sessions = {
            "ray": stack.enter_context(frozen_session(
                "ray", [sys.executable, "-c", BARE_RAY], "ray is up", {})),
            "packserve": stack.enter_context(frozen_session(
                "packserve", [sys.executable, "-m", "serve_apps", "serve", "--config", str(config)],
                SERVE_READY, {"PACKSERVE_DATA_DIR": str(sim_dir)})),
        }
        target = stack.enter_context(vllm_server(model_dir, SMOLLM_ID))
        plan = schedule(args.rounds)
        for n, mode in enumerate(plan, start=1):
            sid = sessions.get(mode)
            members = list(session_members(sid)) if sid else []
            if sid:
                signal_session(sid, signal.SIGCONT)
            time.sleep(SETTLE_S)
            log(f"round {n} of {len(plan)}: vLLM beside {mode}")
            used, started = cpu_seconds(members), time.monotonic()
            measured: Levels = asyncio.run(measure(f"vllm beside {mode}", target, levels, args))
            cpu[mode].append((cpu_seconds(members) - used, time.monotonic() - started))
            if sid:
                signal_session(sid, signal.SIGSTOP)
            for streams, level in measured.items():
                by_mode[mode].setdefault(streams, []).append(level)
    load_after = uptime()

    rows, compared = floor_rows(by_mode, cpu)
    print_table(f"vLLM's own server beside an idle Ray / packserve ({machine()}), {args.max_tokens} output tokens",
                rows, ["target", "streams", "rounds", "requests", "errors", "ttft_p50_ms", "ttft_mean_ms",
                       "output_tok_s", "round_tok_s", "background_core_pct"])
    print_table("against `none` (packserve's targets in bench/serving.py: throughput ratio >= 0.95, "
                "added p50 TTFT < 10 ms)", compared,
                ["mode", "streams", "throughput_ratio", "added_ttft_p50_ms", "added_ttft_mean_ms",
                 "background_core_pct"])
    print(f"\nuptime before: {load_before}\nuptime after:  {load_after}")
    if args.json:
        emit_json({"benchmark": "ray_floor", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                   "machine": machine(), "model": SMOLLM_ID, "max_tokens": args.max_tokens, "rounds": args.rounds,
                   "rows": rows, "against_none": compared, "uptime_before": load_before, "uptime_after": load_after})


if __name__ == "__main__":  # vLLM and Ray spawn processes that re-import this module
    main()
