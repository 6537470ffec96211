"""Engine-neutral request, chunk and usage types, and `Engine`, the one interface every engine implements.

The protocol front-ends (OpenAI, Responses, Anthropic) convert into these, and
every engine (simulated, vLLM, embeddings, the Ray Serve handle) speaks only
these, so neither side knows the other's wire format.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any, Literal

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
    # The account it runs for, and (dispatched over a full model by the fair scheduler) the account one
    # of whose running sequences the engine pauses to start it at once: see `Engine.generate`.
    owner: str = ""
    preempt: str | None = None


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
    `Engine.is_warm`), so the gateway can give the slot and the charge back,
    wait for the cold start, and dispatch again.
    """

    def __init__(self, message: str = "the model's deployment is at zero replicas", *,
                 before_first_token: bool = True) -> None:
        super().__init__(message, before_first_token=True)


class Engine(ABC):
    """What the gateway and a model replica need from an engine: requests and chunks in, and its lifecycle.

    Every engine (simulated, vLLM, embeddings, the Ray Serve handle) subclasses
    this. The request methods are each engine's own; the lifecycle methods
    default to an engine that is always warm, loads on its first request, has
    no health probe and holds nothing to free, and each engine overrides what
    it has.
    """

    # -- requests ---------------------------------------------------------------

    @abstractmethod
    def cards(self) -> list[ModelCard]: ...

    @abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        """The generation's chunks; closing the generator early aborts it in the engine.

        An engine with a bound on the sequences it runs, given a request with
        `preempt` while it runs that many, pauses one running sequence whose
        `owner` is `preempt` (if it has one it can resume exactly) so the
        request starts at once; the paused one resumes, its stream unchanged
        but for the pause, when a sequence frees.
        """

    @abstractmethod
    async def count_tokens(
        self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None, tools: tuple[ToolSpec, ...]
    ) -> int: ...

    @abstractmethod
    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult: ...

    @abstractmethod
    async def abort(self, request_id: str) -> None: ...

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Load the model (once); returns when requests can be served. Requests start the engine themselves."""
        return None

    def is_warm(self, model: str) -> bool:
        """Whether a request for `model` would be served without a cold start; must not wait."""
        return True

    async def ensure_ready(self, model: str, timeout_s: float) -> bool:
        """Start `model` if needed and wait up to `timeout_s` for it; False if it is not ready by then.

        `timeout_s <= 0` only starts it and says whether it was warm already.
        """
        return True

    def unfinished_requests(self) -> int | None:
        """Requests the engine itself still runs or holds; None for an engine that does not report it."""
        return None

    async def check_health(self) -> None:
        """Raise if the engine is wedged (the replica is then restarted)."""
        return None

    def shutdown(self) -> None:
        """Free what the engine holds (worker processes, memory); it serves nothing afterwards."""
        return None
