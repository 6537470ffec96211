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
import logging
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import Any

from cluster.settings import default_data_dir
from serve_apps.config import AppConfig, ConfigError, ModelConfig
from serve_apps.deploy.serving_plan import served_models
from serve_apps.engines.embeddings_engine import EmbeddingsEngine
from serve_apps.engines.errors import UnknownModel
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
from serve_apps.engines.vllm.engine import LoraAdapter, VllmEngine

log = logging.getLogger("packserve.model_server")

# Enough history for a test or an operator to see recent aborts, bounded so a
# long-running replica does not grow without limit.
ABORTED_HISTORY = 1024
BUILTIN = "builtin:"


def make_engine(model_cfg: ModelConfig, config: AppConfig) -> Engine:
    """Build the engine for one deployment: `model_cfg` is the base (chat or embeddings) model.

    This is the single place where the catalog meets the engines. The engine
    modules import vllm and torch only inside their methods, so importing them
    here costs nothing on a sim-only install.
    """
    served = served_models(config, model_cfg.id)
    if config.engine == "sim":
        sim = config.sim
        return SimulatedEngine(ttft_s=sim.ttft_ms / 1000, tokens_per_s=sim.tokens_per_s,
                               prefill_s_per_uncached_token=sim.prefill_ms_per_uncached_token / 1000,
                               start_s=sim.start_s, max_seqs=sim.max_seqs)
    args = model_cfg.vllm
    if args is None:
        raise ConfigError(f"{model_cfg.id}: engine is vllm but the model has no 'vllm' section")
    model_dir = resolve_model_dir(args.model, config)
    if model_cfg.kind == "embeddings":
        return EmbeddingsEngine(model_cfg.card(), model_dir)
    # Adapter paths resolve like model paths: `builtin:fix-json-lora` is the catalog build's adapter.
    adapters = [LoraAdapter(m.card(), resolve_model_dir(m.adapter_path or "", config))
                for m in served[1:]]
    return VllmEngine(model_cfg.card(), args.for_replica(model_dir, len(adapters)), adapters)


def resolve_model_dir(model: str, config: AppConfig) -> str:
    """`builtin:NAME` → the embedded catalog's build directory; anything else (a path or a hub id) as is."""
    name = model.removeprefix(BUILTIN)
    if name == model:
        return model
    # catalog_build writes each embedded model to <data_dir>/models/<NAME>.
    path = (config.store.data_dir or default_data_dir()) / "models" / name
    if not path.is_dir():
        raise ConfigError(f"{model}: {path} is not built yet; run `python -m serve_apps.catalog.build` "
                          "(packserve serve does it before starting Ray)")
    return str(path)


class ModelServer:
    """One engine for one catalog model (plus its adapters), called through a DeploymentHandle.

    Aborts come from cancellation: when the gateway's client disconnects, the
    gateway cancels its `DeploymentResponseGenerator`, Ray cancels the task
    running `generate` here, and the engine's generator is closed inside it,
    which is how both engines stop work. `abort(request_id)` exists for the
    Engine interface but only reaches this replica, so the proxy never relies
    on it alone.
    """

    # Until __init__ has built the engine there is nothing for __del__ to shut down.
    _closed = True

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
                with contextlib.suppress(Exception):
                    await asyncio.shield(agen.aclose())

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
        """The ids this replica serves, once the engine has loaded (vLLM loads lazily, in a worker thread)."""
        await self._engine.start()
        return sorted(self._served)

    async def stats(self) -> dict[str, Any]:
        """Counters for tests and operators: in-flight and recently aborted request ids.

        `unfinished` is what the engine itself still holds (vLLM's running and
        waiting sequences), or None for engines that do not report it; after a
        client disconnect it must drop back, or the abort did not reach vLLM.
        """
        return {"model": self._model_id, "in_flight": sorted(self._in_flight), "aborted": list(self._aborted),
                "started": self._started, "finished": self._finished,
                "unfinished": self._engine.unfinished_requests(), "replica": _replica_id()}

    async def check_health(self) -> None:
        """Ray Serve's periodic probe; delegated so a wedged vLLM engine gets its replica restarted."""
        await self._engine.check_health()

    def __del__(self) -> None:
        # vLLM holds worker processes and shared memory; free them when Serve stops the replica.
        if self._closed:
            return
        self._closed = True
        try:
            self._engine.shutdown()
        except Exception:
            log.exception("engine shutdown failed", extra={"model": self._model_id})

    def _check(self, model: str) -> None:
        if model not in self._served:
            # The gateway routes by catalog id: a replica built from another catalog (a redeploy in progress).
            raise UnknownModel(model)


def _replica_id() -> str | None:
    """This Serve replica's id (stats from several replicas are told apart by it), or None outside Ray Serve."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    try:
        return str(serve.get_replica_context().replica_id.unique_id)
    except RayServeException:
        return None
