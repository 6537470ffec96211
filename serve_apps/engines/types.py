"""Engine-neutral request, chunk and usage types.

Both protocol front-ends (OpenAI, Anthropic) convert into these, and every
engine (the simulated one, vLLM) speaks only these, so neither side knows the
other's wire format.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

Role = Literal["system", "user", "assistant", "tool"]
FinishReason = Literal["stop", "length", "tool_calls", "abort", "error"]


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model produced it


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]  # JSON schema, passed through untouched


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None  # for role == "tool": which call this answers
    name: str | None = None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # 1: off
    # vLLM's sampling extras: at least this many output tokens; keep going past the end-of-sequence token.
    min_tokens: int = 0
    ignore_eos: bool = False


@dataclass(frozen=True)
class OutputFormat:
    """Constrained output (OpenAI `response_format`): any JSON object, or JSON valid against `schema`."""

    kind: Literal["json_object", "json_schema"]
    schema: dict[str, Any] | None = None


STRUCTURED_OUTPUTS = "structured_outputs"  # the model-card feature of engines that honour OutputFormat


@dataclass(frozen=True)
class GenerationRequest:
    """One generation. Exactly one of `messages` (chat) or `prompt` (completion) is set."""

    request_id: str
    model: str
    sampling: SamplingParams
    messages: tuple[ChatMessage, ...] = ()
    prompt: str | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: str | dict[str, Any] | None = None  # "auto" | "none" | "required" | {"name": ...}
    output_format: OutputFormat | None = None


@dataclass(frozen=True)
class TokenUsage:
    """Token counts of one request. `prompt_tokens` includes the cached ones."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0

    @property
    def uncached_prompt_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class GenerationChunk:
    """A piece of a streamed generation.

    Deltas are incremental. The last chunk has `finish_reason` set and carries
    the final `usage`; earlier chunks may carry a running `usage` too so a
    caller that stops early still knows what was generated so far.
    """

    text: str = ""
    reasoning: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason | None = None
    usage: TokenUsage | None = None
    # Which stop string ended the generation, so Anthropic can say "stop_sequence".
    stop_sequence: str | None = None


@dataclass(frozen=True)
class EmbeddingRequest:
    request_id: str
    model: str
    inputs: tuple[str, ...]


@dataclass(frozen=True)
class EmbeddingResult:
    vectors: tuple[tuple[float, ...], ...]
    prompt_tokens: int


@dataclass(frozen=True)
class ModelCard:
    """What the catalog says about a model; drives GET /models and admission."""

    id: str
    kind: Literal["chat", "embeddings", "lora"]
    size_class: Literal["standard", "small", "unmetered"]
    input_price_micro: int  # micro-dollars per million input tokens
    output_price_micro: int  # micro-dollars per million output tokens
    context_length: int
    max_output_tokens: int
    owned_by: str = "packserve"
    features: tuple[str, ...] = ()  # e.g. "tools", "reasoning", "streaming"
    base_model: str | None = None  # for LoRA adapters
    extra: dict[str, Any] = field(default_factory=dict)


class EngineError(Exception):
    """The engine failed. `before_first_token` decides the request-bar refund."""

    def __init__(self, message: str, *, before_first_token: bool) -> None:
        super().__init__(message)
        self.before_first_token = before_first_token

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions unpickle as `cls(*args)`, which would drop the keyword-only
        # flag and fail; this error crosses the Ray boundary from model replicas.
        return (_rebuild_engine_error, (type(self), str(self), self.before_first_token))


def _rebuild_engine_error(cls: type[EngineError], message: str, before_first_token: bool) -> EngineError:
    return cls(message, before_first_token=before_first_token)


class RequestRejected(EngineError):
    """The engine refused the request as invalid (e.g. a JSON schema it cannot compile): a 400, never charged."""

    def __init__(self, message: str) -> None:
        super().__init__(message, before_first_token=True)

    def __reduce__(self) -> tuple[Any, ...]:
        return (RequestRejected, (str(self),))


class PromptTooLong(RequestRejected):
    """The prompt does not fit the model's context: the client's error (a 400), nothing ran, never charged.

    Coding agents watch for exactly this answer to compact their history
    (OpenAI's `context_length_exceeded`, Anthropic's "prompt is too long"); a
    502 made them retry the same oversized prompt.
    """

    def __init__(self, prompt_tokens: int, limit: int) -> None:
        super().__init__(f"the prompt is {prompt_tokens} tokens, more than the model's context of {limit}")
        self.prompt_tokens = prompt_tokens
        self.limit = limit

    def __reduce__(self) -> tuple[Any, ...]:
        return (PromptTooLong, (self.prompt_tokens, self.limit))


class ModelStarting(EngineError):
    """The model's deployment was found at zero replicas after dispatch: nothing ran.

    Raised before the first chunk by engines that can scale to zero (see
    `WarmableEngine`), so the gateway can give the slot and the charge back,
    wait for the cold start, and dispatch again.
    """

    def __init__(self, message: str = "the model's deployment is at zero replicas", *,
                 before_first_token: bool = True) -> None:
        super().__init__(message, before_first_token=True)


class Engine(Protocol):
    """What the gateway needs from a model server, at the request/chunk level."""

    def cards(self) -> list[ModelCard]: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]: ...

    async def count_tokens(
        self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None, tools: tuple[ToolSpec, ...]
    ) -> int: ...

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    async def abort(self, request_id: str) -> None: ...


class WarmableEngine(Engine, Protocol):
    """Optional extra of an Engine whose model can be at zero replicas (a Ray Serve deployment).

    The gateway looks these methods up with getattr: an engine without them
    (the simulated engine, any in-process engine) is always warm.
    """

    def is_warm(self, model: str) -> bool:
        """Whether a request would be served without a cold start; must not wait."""
        ...

    async def ensure_ready(self, model: str, timeout_s: float) -> bool:
        """Start the model if needed and wait up to `timeout_s` for it; False if it is not ready by then."""
        ...
