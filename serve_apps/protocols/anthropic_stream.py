"""Server-sent-event encoder for Anthropic Messages streams.

Emits, in order: `message_start`; per content block `content_block_start`,
its `content_block_delta`s and `content_block_stop`; `message_delta` with the
stop reason and final usage; `message_stop`. Blocks open and close as the
kind of delta changes (thinking → text → tool_use), so indices increase by
one per block exactly as the Anthropic SDK's accumulator expects.
"""

from __future__ import annotations

from typing import Literal

from serve_apps.engines.types import FinishReason, GenerationChunk, TokenUsage
from serve_apps.protocols.anthropic_convert import error_body, stop_reason, usage_out
from serve_apps.protocols.anthropic_models import (
    ContentBlockDeltaEvent,
    ContentBlockOut,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    InputJsonDelta,
    MessageDelta,
    MessageDeltaEvent,
    MessageOut,
    MessageStartEvent,
    MessageStopEvent,
    PingEvent,
    TextBlockOut,
    TextDelta,
    ThinkingBlockOut,
    ThinkingDelta,
    ToolUseBlockOut,
)
from serve_apps.protocols.common import ResponseModel, dumps

_BlockKind = Literal["thinking", "text", "tool_use"]


def sse_event(event: ResponseModel) -> str:
    payload = event.model_dump(mode="json")
    return f"event: {payload['type']}\ndata: {dumps(payload)}\n\n"


def error_event(message: str, type_: str = "api_error") -> str:
    """A mid-stream failure as Anthropic sends it; the SDK raises on `event: error`."""
    return f"event: error\ndata: {dumps(error_body(500, message, type_))}\n\n"


class AnthropicStreamEncoder:
    """Turns engine chunks into Anthropic stream events for one message.

    `message_start` needs the prompt's (cached) token counts, which only the
    engine knows, so it is sent lazily with the first chunk unless `start()`
    is called explicitly.
    """

    def __init__(self, message_id: str, model: str) -> None:
        self.message_id = message_id
        self.model = model
        self._started = False
        self._finished = False
        self._index = -1
        self._open: _BlockKind | None = None
        self._usage: TokenUsage | None = None
        self._finish_reason: FinishReason | None = None
        self._stop_sequence: str | None = None

    def start(self, usage: TokenUsage | None = None) -> list[str]:
        if self._started:
            return []
        self._started = True
        usage = usage or self._usage or TokenUsage()
        message = MessageOut(
            id=self.message_id,
            model=self.model,
            content=[],
            stop_reason=None,
            usage=usage_out(usage),
        )
        return [sse_event(MessageStartEvent(message=message))]

    def ping(self) -> list[str]:
        """A keep-alive. Before `message_start` an SSE comment, which every client
        ignores, since a `ping` event must not precede `message_start`."""
        if not self._started:
            return [": ping\n\n"]
        return [sse_event(PingEvent())]

    def _close(self) -> list[str]:
        if self._open is None:
            return []
        self._open = None
        return [sse_event(ContentBlockStopEvent(index=self._index))]

    def _open_block(self, kind: _BlockKind, block: ContentBlockOut) -> list[str]:
        out = self._close()
        self._index += 1
        self._open = kind
        out.append(sse_event(ContentBlockStartEvent(index=self._index, content_block=block)))
        return out

    def chunk(self, chunk: GenerationChunk) -> list[str]:
        if chunk.usage is not None:
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._finish_reason = chunk.finish_reason
            self._stop_sequence = chunk.stop_sequence
        out = self.start()
        if chunk.reasoning:
            if self._open != "thinking":
                out += self._open_block("thinking", ThinkingBlockOut(thinking=""))
            out.append(
                sse_event(ContentBlockDeltaEvent(index=self._index, delta=ThinkingDelta(thinking=chunk.reasoning)))
            )
        if chunk.text:
            if self._open != "text":
                out += self._open_block("text", TextBlockOut(text=""))
            out.append(sse_event(ContentBlockDeltaEvent(index=self._index, delta=TextDelta(text=chunk.text))))
        for call in chunk.tool_calls:
            # Each call is its own block; the input arrives as JSON text in one delta.
            out += self._open_block("tool_use", ToolUseBlockOut(id=call.id, name=call.name, input={}))
            out.append(
                sse_event(ContentBlockDeltaEvent(index=self._index, delta=InputJsonDelta(partial_json=call.arguments)))
            )
            out += self._close()
        return out

    def finish(
        self,
        usage: TokenUsage | None = None,
        finish_reason: FinishReason | None = None,
        stop_sequence: str | None = None,
    ) -> list[str]:
        """Close the open block, then `message_delta` and `message_stop`.

        Arguments default to what the chunks said. The final usage repeats
        input and cache-read counts so a client reading only `message_delta`
        still sees the whole bill.
        """
        if self._finished:
            return []
        self._finished = True
        out = self.start(usage)
        out += self._close()
        reason = stop_reason(finish_reason or self._finish_reason, stop_sequence or self._stop_sequence)
        delta = MessageDelta(
            stop_reason=reason,
            stop_sequence=(stop_sequence or self._stop_sequence) if reason == "stop_sequence" else None,
        )
        final = usage or self._usage or TokenUsage()
        out.append(sse_event(MessageDeltaEvent(delta=delta, usage=usage_out(final))))
        out.append(sse_event(MessageStopEvent()))
        return out
