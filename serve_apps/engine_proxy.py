"""`DeploymentEngine`: the `Engine` protocol over a Ray Serve DeploymentHandle.

The gateway holds a mapping model id → Engine. Under uvicorn those are local
engines; under Ray Serve each is one of these, calling the model's
`ModelServer` deployment, so the gateway code is identical in both.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ToolSpec,
)

# Serve-side failures that happen before the replica ran anything: nothing was
# generated, so the request bar is refunded (EngineError before_first_token).
_NOT_STARTED = (BackPressureError, DeploymentUnavailableError)


class DeploymentEngine:
    """An `Engine` whose work runs in a model deployment's replicas.

    Cancellation is the abort path: the gateway cancels or closes this
    generator when its client disconnects, and the `finally` below cancels
    the remote generator, which cancels `ModelServer.generate` in whichever
    replica runs it (an `abort(request_id)` call could land on another
    replica, so it is mapped to the same cancel).
    """

    def __init__(self, handle: DeploymentHandle[Any], cards: list[ModelCard]) -> None:
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._cards = list(cards)
        self._running: dict[str, DeploymentResponseGenerator[GenerationChunk]] = {}

    def cards(self) -> list[ModelCard]:
        return list(self._cards)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        remote = cast(DeploymentResponseGenerator[GenerationChunk], self._stream.generate.remote(request))
        self._running[request.request_id] = remote
        first = True
        done = False
        try:
            while True:
                try:
                    chunk = await remote.__anext__()
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    raise _engine_error(exc, before_first_token=first) from None
                first = False
                yield chunk
            done = True
        finally:
            self._running.pop(request.request_id, None)
            if not done:
                remote.cancel()  # type: ignore[no-untyped-call]

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        try:
            result: EmbeddingResult = await self._handle.embed.remote(request)
        except Exception as exc:
            raise _engine_error(exc, before_first_token=True) from None
        return result

    async def count_tokens(self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None,
                           tools: tuple[ToolSpec, ...]) -> int:
        try:
            count: int = await self._handle.count_tokens.remote(model, messages, prompt, tools)
        except Exception as exc:
            raise _engine_error(exc, before_first_token=True) from None
        return count

    async def abort(self, request_id: str) -> None:
        remote = self._running.pop(request_id, None)
        if remote is not None:
            remote.cancel()  # type: ignore[no-untyped-call]

    async def stats(self) -> dict[str, Any]:
        """The model deployment's counters (from one replica: the one the router picks)."""
        result: dict[str, Any] = await self._handle.stats.remote()
        return result


def _engine_error(exc: BaseException, *, before_first_token: bool) -> BaseException:
    """Map a Ray-side failure to what the gateway understands; user-code errors keep their type."""
    cause: BaseException = exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
    if isinstance(cause, EngineError):
        return EngineError(str(cause), before_first_token=cause.before_first_token)
    if isinstance(cause, KeyError):
        # The gateway maps KeyError (an id the engine does not serve) to a 404.
        return KeyError(*cause.args)
    if isinstance(cause, asyncio.CancelledError | RequestCancelledError | TaskCancelledError):
        return asyncio.CancelledError()
    if isinstance(cause, _NOT_STARTED):
        return EngineError(f"the model deployment is unavailable: {type(cause).__name__}", before_first_token=True)
    return EngineError(f"model replica failed: {type(cause).__name__}", before_first_token=before_first_token)
