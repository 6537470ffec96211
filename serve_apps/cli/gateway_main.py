"""`packserve gateway --engine sim`: the gateway alone under uvicorn, no Ray.

For development, tests and benchmarks: the deterministic simulated engine
serves the simulated catalog of SPEC §5.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import uvicorn
import uvloop

from cluster.settings import admin_token_from_env
from cluster.store import StoreError
from policies.fairness import SchedulerMode
from serve_apps.config import AppConfig, ConfigError, load_config
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.gateway.app import build_gateway_app, create_runtime
from serve_apps.host.health_listener import HealthListener, LoopTicker
from serve_apps.host.uvicorn_compat import UVICORN_KEEP_ALIVE_S, header_timeout_protocol
from serve_apps.logs import setup_logging

# How often the event loop marks itself alive for the health port (its lag is measured against this).
HEALTH_TICK_S = 0.1


def sim_engine(config: AppConfig, ttft_ms: float | None, tokens_per_s: float | None) -> SimulatedEngine:
    """Command-line values win over the config file's `sim:` section, 0 included."""
    return SimulatedEngine(ttft_s=(config.sim.ttft_ms if ttft_ms is None else ttft_ms) / 1000,
                           tokens_per_s=config.sim.tokens_per_s if tokens_per_s is None else tokens_per_s,
                           max_seqs=config.sim.max_seqs)


async def serve_gateway(config: AppConfig, host: str, port: int, ttft_ms: float | None = None,
                        tokens_per_s: float | None = None) -> None:
    engine = sim_engine(config, ttft_ms, tokens_per_s)
    cards = {c.id: c for c in engine.cards()}
    runtime = await create_runtime(config, {cid: engine for cid in cards}, cards, admin_token=admin_token_from_env(),
                                   address=f"{host}:{port}")
    app = build_gateway_app(runtime)
    gw = config.gateway
    server = uvicorn.Server(uvicorn.Config(
        app, host=host, port=port, access_log=gw.access_log, log_level="warning", lifespan="on",
        http=header_timeout_protocol(gw.header_timeout_s),
        timeout_keep_alive=gw.keep_alive_timeout_s or UVICORN_KEEP_ALIVE_S))
    health = None
    if gw.health_port is not None:
        ticker = LoopTicker(HEALTH_TICK_S)
        ticker.start(asyncio.get_running_loop())
        health = HealthListener(host, gw.health_port, ticker, gw.health_stall_s,
                                lambda: {"models": len(cards), "settlements_pending": len(runtime.controller.outbox)})
        health.start()
    print(f"packserve gateway (simulated engine) on http://{host}:{port}  "
          f"OpenAI: http://{host}:{port}/v1  Anthropic: http://{host}:{port}/anthropic"
          + (f"  health: http://{host}:{health.port}/health" if health else ""), file=sys.stderr, flush=True)
    try:
        await server.serve()
    finally:
        if health is not None:
            health.stop()


def with_command_line(config: AppConfig, sim_max_seqs: int | None, scheduler: str | None,
                      health_port: int | None = None, preempt: bool | None = None) -> AppConfig:
    """`--sim-max-seqs`, `--scheduler`, `--preempt` and `--health-port` win over the config file (read from there)."""
    if health_port is not None:
        config = config.model_copy(update={"gateway": config.gateway.model_copy(update={"health_port": health_port})})
    if sim_max_seqs is not None:
        if sim_max_seqs < 1:
            raise ValueError("--sim-max-seqs must be at least 1")
        config = config.model_copy(update={"sim": config.sim.model_copy(update={"max_seqs": sim_max_seqs})})
    if scheduler is not None:
        mode = SchedulerMode(scheduler)
        config = config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"mode": mode})})
    if preempt is not None:
        config = config.model_copy(update={"scheduler": config.scheduler.model_copy(update={"preempt": preempt})})
    return config


def run_gateway(args: argparse.Namespace) -> int:
    setup_logging()
    try:
        config = load_config(args.config)
        if args.redis_url:
            config = config.model_copy(update={"store": config.store.model_copy(update={"redis_url": args.redis_url})})
        if args.data_dir:
            config = config.model_copy(update={"store": config.store.model_copy(update={"data_dir": args.data_dir})})
        config = with_command_line(config, getattr(args, "sim_max_seqs", None), getattr(args, "scheduler", None),
                                   getattr(args, "health_port", None), getattr(args, "preempt", None))
        # uvloop: measured ~25% more requests/s at 64 streams than the default loop (bench/RESULTS.md).
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve_gateway(config, args.host, args.port, args.sim_ttft_ms, args.sim_tokens_per_s))
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"packserve: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
