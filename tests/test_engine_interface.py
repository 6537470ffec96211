"""One engine interface: every engine is an `Engine`, and the model replica drives its lifecycle through it.

The replica (`ModelServer`, plain Python as Ray Serve runs it) calls the
engine's start, health probe, unfinished count and shutdown directly; an
engine that has none of its own gets the defaults (always warm, no probe,
nothing to free). And one typed vLLM-arguments model goes from the config to
the engine: what `--dry-run` shows is what the replica's engine is built from.
"""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path
from typing import Any

import pytest
import yaml

from serve_apps.config import AppConfig
from serve_apps.deploy.engine_proxy import DeploymentEngine
from serve_apps.deploy.model_server import ModelServer
from serve_apps.deploy.serving_plan import plan
from serve_apps.engines.embeddings_engine import EmbeddingsEngine
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import Engine
from serve_apps.engines.vllm.engine import VllmEngine

SMALL = "hf:packserve/sim-small"
LOCAL = Path(__file__).resolve().parent.parent / "serve_apps" / "configs" / "local.yaml"


class Recording(SimulatedEngine):
    """The simulated engine with a lifecycle of its own that records what the replica asked of it."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.healthy = True

    async def start(self) -> None:
        self.calls.append("start")

    def unfinished_requests(self) -> int | None:
        return 7

    async def check_health(self) -> None:
        self.calls.append("check_health")
        if not self.healthy:
            raise RuntimeError("engine core died")

    def shutdown(self) -> None:
        self.calls.append("shutdown")


def test_every_engine_is_an_engine() -> None:
    for engine in (SimulatedEngine, EmbeddingsEngine, VllmEngine, DeploymentEngine):
        assert issubclass(engine, Engine), engine


def test_an_engine_without_a_lifecycle_of_its_own_gets_the_defaults() -> None:
    engine = SimulatedEngine()

    async def go() -> tuple[bool, bool]:
        await engine.start()
        await engine.check_health()
        return engine.is_warm(SMALL), await engine.ensure_ready(SMALL, 0)

    assert asyncio.run(go()) == (True, True)
    assert engine.unfinished_requests() is None
    engine.shutdown()


def test_the_replica_drives_its_engines_lifecycle() -> None:
    server = ModelServer(SMALL, AppConfig().model_dump(mode="json"))
    engine = Recording()
    server._engine = engine
    assert asyncio.run(server.ready()) == [SMALL]
    assert asyncio.run(server.stats())["unfinished"] == 7
    asyncio.run(server.check_health())
    engine.healthy = False
    with pytest.raises(RuntimeError, match="engine core died"):
        asyncio.run(server.check_health())
    assert engine.calls == ["start", "check_health", "check_health"]
    del server
    gc.collect()
    assert engine.calls[-1] == "shutdown" and engine.calls.count("shutdown") == 1


def test_the_simulated_replica_reports_no_unfinished_count() -> None:
    server = ModelServer(SMALL, AppConfig().model_dump(mode="json"))
    assert asyncio.run(server.stats())["unfinished"] is None


def test_the_planned_vllm_arguments_are_the_replicas() -> None:
    raw: dict[str, Any] = yaml.safe_load(LOCAL.read_text())
    chat = next(m for m in raw["models"] if m["kind"] == "chat")
    chat["vllm"].update({"enable_lora": False, "max_loras": 1})
    config = AppConfig.model_validate(raw)
    base = next(m for m in config.models if m.kind == "chat")
    assert base.vllm is not None
    [adapter] = [m for m in config.models if m.kind == "lora"]
    [planned] = [p.engine_args for p in plan(config) if p.model_id == base.id]
    # The catalog's adapter turns LoRA on, in the plan and in the replica's engine arguments alike.
    replica = base.vllm.for_replica("/models/smollm", adapters=1)
    assert replica.enable_lora and planned["enable_lora"] is True
    assert replica.model == "/models/smollm"
    assert planned == {**replica.model_dump(mode="json", exclude_none=True), "model": base.vllm.model,
                       "lora_modules": {adapter.id: adapter.adapter_path}}
    # Without adapters nothing is changed.
    assert base.vllm.with_adapters(0) is base.vllm
