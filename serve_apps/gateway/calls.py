"""What each API route hands the request story (`GatewayService`): one parsed request, in its wire format.

The routes parse and encode; the service runs every step between, in one
order, whichever API the request came through.
"""

from __future__ import annotations

from typing import Any, Protocol

from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationRequest,
    ModelCard,
    ToolSpec,
)
from serve_apps.gateway.streaming import SseEvents
from serve_apps.protocols.common import GenerationResult


class GenerationCall(Protocol):
    """A chat, completion, message or response request."""

    @property
    def model(self) -> str: ...

    @property
    def stream(self) -> bool: ...

    def generation(self, card: ModelCard) -> GenerationRequest:
        """The engine-neutral request; raises InvalidRequest (a 400) for what cannot be served as asked."""
        ...

    def events(self, created: int) -> SseEvents:
        """The SSE events of the streamed answer (`created`: when generation started, epoch seconds)."""
        ...

    def answer(self, result: GenerationResult, created: int) -> dict[str, Any]:
        """The JSON body of the whole answer."""
        ...


class EmbeddingCall(Protocol):
    @property
    def model(self) -> str: ...

    def embedding(self) -> EmbeddingRequest:
        """The engine-neutral request; raises InvalidRequest (a 400) for what cannot be served as asked."""
        ...

    def answer(self, result: EmbeddingResult) -> dict[str, Any]: ...


class TokenCountCall(Protocol):
    @property
    def model(self) -> str: ...

    def prompt(self) -> tuple[tuple[ChatMessage, ...], tuple[ToolSpec, ...]]: ...
