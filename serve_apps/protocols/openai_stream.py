"""Server-sent-event encoders for OpenAI chat and text completions.

Each encoder is a small state object fed engine-neutral chunks; it never
parses another protocol's output. Every method returns the complete SSE
frames (`data: {...}\\n\\n`) to write, possibly none.
"""

from __future__ import annotations

from typing import Any

from serve_apps.engines.types import FinishReason, GenerationChunk, TokenUsage
from serve_apps.protocols.common import dumps
from serve_apps.protocols.openai_convert import (
    chat_finish_reason,
    completion_finish_reason,
    error_body,
    usage_model,
)
from serve_apps.protocols.openai_models import (
    ChatCompletionChunk,
    ChatFinishReason,
    ChunkChoice,
    ChunkDelta,
    CompletionChoice,
    CompletionResponse,
    DeltaFunction,
    DeltaToolCall,
)

DONE = "data: [DONE]\n\n"


def sse_data(payload: dict[str, Any]) -> str:
    return f"data: {dumps(payload)}\n\n"


def error_event(message: str, type_: str = "server_error", code: str | None = None) -> str:
    """A mid-stream failure. The OpenAI SDK raises `APIError` on a `data` event carrying `error`;
    the gateway should end the stream after it, without `[DONE]`."""
    return sse_data(error_body(500, message, type_, code))


class _StreamState:
    def __init__(self) -> None:
        self.finish_reason: FinishReason | None = None
        self.usage: TokenUsage | None = None
        self.finished = False

    def observe(self, chunk: GenerationChunk) -> None:
        if chunk.usage is not None:
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason


class OpenAIChatStreamEncoder:
    """`chat.completion.chunk` events: role first, then deltas, finish, optional usage, `[DONE]`."""

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self.response_id = response_id
        self.model = model
        self.created = created
        self._state = _StreamState()
        self._started = False
        self._tool_calls = 0

    def _event(self, delta: ChunkDelta, finish_reason: ChatFinishReason | None = None) -> str:
        body = ChatCompletionChunk(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=[ChunkChoice(delta=delta, finish_reason=finish_reason)],
        )
        return sse_data(body.model_dump(mode="json"))

    def start(self) -> list[str]:
        """The opening role chunk; safe to call before the engine has produced anything."""
        if self._started:
            return []
        self._started = True
        return [self._event(ChunkDelta(role="assistant", content=""))]

    def chunk(self, chunk: GenerationChunk) -> list[str]:
        out = self.start()
        self._state.observe(chunk)
        if chunk.reasoning:
            out.append(self._event(ChunkDelta(reasoning_content=chunk.reasoning)))
        if chunk.text:
            out.append(self._event(ChunkDelta(content=chunk.text)))
        for call in chunk.tool_calls:
            # Engines hand over whole calls, so one delta carries id, name and all
            # arguments; the SDK's accumulator handles that like a split one.
            delta = DeltaToolCall(
                index=self._tool_calls,
                id=call.id,
                type="function",
                function=DeltaFunction(name=call.name, arguments=call.arguments),
            )
            self._tool_calls += 1
            out.append(self._event(ChunkDelta(tool_calls=[delta])))
        return out

    def finish(
        self,
        usage: TokenUsage | None = None,
        include_usage: bool = False,
        finish_reason: FinishReason | None = None,
    ) -> list[str]:
        """Final chunk with finish_reason, the usage chunk (`choices: []`) if asked, then `[DONE]`.

        `usage` and `finish_reason` default to what the last chunks said.
        """
        if self._state.finished:
            return []
        self._state.finished = True
        out = self.start()
        reason = chat_finish_reason(finish_reason or self._state.finish_reason, self._tool_calls > 0)
        out.append(self._event(ChunkDelta(), reason))
        final_usage = usage or self._state.usage or TokenUsage()
        if include_usage:
            body = ChatCompletionChunk(
                id=self.response_id,
                created=self.created,
                model=self.model,
                choices=[],
                usage=usage_model(final_usage),
            )
            out.append(sse_data(body.model_dump(mode="json")))
        out.append(DONE)
        return out


class OpenAICompletionStreamEncoder:
    """`text_completion` stream: text chunks, a finish chunk, optional usage chunk, `[DONE]`."""

    def __init__(self, response_id: str, model: str, created: int) -> None:
        self.response_id = response_id
        self.model = model
        self.created = created
        self._state = _StreamState()

    def _body(self, choices: list[CompletionChoice], usage: TokenUsage | None = None) -> str:
        body = CompletionResponse(
            id=self.response_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage_model(usage) if usage is not None else None,
        )
        return sse_data(body.model_dump(mode="json"))

    def start(self) -> list[str]:
        # Text completions have no role preamble; kept for symmetry with chat.
        return []

    def chunk(self, chunk: GenerationChunk) -> list[str]:
        self._state.observe(chunk)
        if not chunk.text:
            return []
        return [self._body([CompletionChoice(text=chunk.text)])]

    def finish(
        self,
        usage: TokenUsage | None = None,
        include_usage: bool = False,
        finish_reason: FinishReason | None = None,
    ) -> list[str]:
        if self._state.finished:
            return []
        self._state.finished = True
        reason = completion_finish_reason(finish_reason or self._state.finish_reason)
        out = [self._body([CompletionChoice(text="", finish_reason=reason)])]
        if include_usage:
            out.append(self._body([], usage or self._state.usage or TokenUsage()))
        out.append(DONE)
        return out
