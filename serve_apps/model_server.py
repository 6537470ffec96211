"""`ModelServer`: the Ray Serve deployment class that owns one engine.

One replica serves one catalog model (a chat model with its LoRA adapters, or
an embeddings model). The class is plain Python: `ray_app` wraps it with
`serve.deployment(...)`, so it can also be constructed directly in tests.
Requests and chunks are the frozen dataclasses of `engines.types`; they cross
the Ray boundary pickled, and so does `EngineError` (it defines `__reduce__`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from serve_apps.config import AppConfig, ConfigError, ModelConfig
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ToolSpec,
)
from serve_apps.serving_plan import served_models

log = logging.getLogger("packserve.model_server")

# Enough history for a test or an operator to see recent aborts, bounded so a
# long-running replica does not grow without limit.
ABORTED_HISTORY = 1024


def make_engine(model_cfg: ModelConfig, config: AppConfig) -> Engine:
    """Build the engine for one deployment: `model_cfg` is the base (chat or embeddings) model.

    ── vLLM HANDOFF ────────────────────────────────────────────────────────
    The `vllm` branch is the single place where the catalog meets the vLLM
    engines. Their modules are imported by path, lazily, so the sim engine and
    the gateway never import vllm (import-linter and CPU-only installs rely
    on that). Expected constructors:
        VllmEngine(cards: list[ModelCard], settings: VllmSettings)
        EmbeddingsEngine(cards: list[ModelCard], settings: VllmSettings)
        VllmSettings.from_config(args: VllmArgs, adapters: dict[str, str]) -> VllmSettings
    where `cards[0]` is the base model and `adapters` maps each LoRA adapter's
    catalog id to its `adapter_path`.
    ────────────────────────────────────────────────────────────────────────
    """
    served = served_models(config, model_cfg.id)
    cards = [m.card() for m in served]
    if config.engine == "sim":
        return SimulatedEngine(ttft_s=config.sim.ttft_ms / 1000, tokens_per_s=config.sim.tokens_per_s)
    if model_cfg.vllm is None:
        raise ConfigError(f"{model_cfg.id}: engine is vllm but the model has no 'vllm' section")
    module_name = ("serve_apps.engines.embeddings_engine" if model_cfg.kind == "embeddings"
                   else "serve_apps.engines.vllm_engine")
    settings_module = importlib.import_module("serve_apps.engines.vllm_engine")
    engine_module = importlib.import_module(module_name)
    adapters = {m.id: m.adapter_path or "" for m in served[1:]}
    settings = settings_module.VllmSettings.from_config(model_cfg.vllm, adapters)
    engine_cls = engine_module.EmbeddingsEngine if model_cfg.kind == "embeddings" else engine_module.VllmEngine
    engine: Engine = engine_cls(cards, settings)
    return engine


class ModelServer:
    """One engine for one catalog model (plus its adapters), called through a DeploymentHandle.

    Aborts come from cancellation: when the gateway's client disconnects, the
    gateway cancels its `DeploymentResponseGenerator`, Ray cancels the task
    running `generate` here, and the engine's generator is closed inside it,
    which is how both engines stop work. `abort(request_id)` exists for the
    Engine protocol but only reaches this replica, so the proxy never relies
    on it alone.
    """

    def __init__(self, model_id: str, config: Mapping[str, Any]) -> None:
        # The config travels as JSON-mode data: it must survive `serve deploy`
        # style builds and version skew between driver and replicas.
        self._config = AppConfig.model_validate(dict(config))
        base = next((m for m in served_models(self._config, model_id)), None)
        assert base is not None
        self._model_id = model_id
        self._cards = [m.card() for m in served_models(self._config, model_id)]
        self._served = {c.id for c in self._cards}
        self._engine = make_engine(base, self._config)
        self._in_flight: set[str] = set()
        self._aborted: deque[str] = deque(maxlen=ABORTED_HISTORY)
        self._started = 0
        self._finished = 0
        self._closed = False

    # -- the Engine surface ---------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return list(self._cards)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream the engine's chunks one by one: no batching interval, each chunk leaves as soon as it exists."""
        self._check(request.model)
        rid = request.request_id
        agen = self._engine.generate(request)
        self._in_flight.add(rid)
        self._started += 1
        finished = False
        try:
            async for chunk in agen:
                if chunk.finish_reason == "abort":
                    self._aborted.append(rid)
                yield chunk
            finished = True
        finally:
            self._in_flight.discard(rid)
            if finished:
                self._finished += 1
            else:
                # Cancelled (client gone) or closed early: make sure the engine
                # frees the sequence, even if the cancel landed between chunks.
                self._aborted.append(rid)
                aclose = getattr(agen, "aclose", None)
                if aclose is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(aclose())

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check(request.model)
        return await self._engine.embed(request)

    async def count_tokens(self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None,
                           tools: tuple[ToolSpec, ...]) -> int:
        self._check(model)
        return await self._engine.count_tokens(model, messages, prompt, tools)

    async def abort(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    # -- operations -----------------------------------------------------------

    async def ready(self) -> list[str]:
        """The ids this replica serves; answering at all means the engine finished loading."""
        return sorted(self._served)

    async def stats(self) -> dict[str, Any]:
        """Counters for tests and operators: in-flight and recently aborted request ids."""
        return {"model": self._model_id, "in_flight": sorted(self._in_flight), "aborted": list(self._aborted),
                "started": self._started, "finished": self._finished}

    async def check_health(self) -> None:
        """Ray Serve's periodic probe; delegated so a wedged vLLM engine gets its replica restarted."""
        probe = getattr(self._engine, "check_health", None)
        if probe is not None:
            result = probe()
            if asyncio.iscoroutine(result):
                await result

    def __del__(self) -> None:
        # vLLM holds worker processes and shared memory; free them when Serve stops the replica.
        if getattr(self, "_closed", True):
            return
        self._closed = True
        shutdown = getattr(self._engine, "shutdown", None)
        if shutdown is not None:
            try:
                shutdown()
            except Exception:
                log.exception("engine shutdown failed", extra={"model": self._model_id})

    def _check(self, model: str) -> None:
        if model not in self._served:
            # The gateway routes by catalog id, so this means a routing bug; KeyError maps to 404 there.
            raise KeyError(model)
