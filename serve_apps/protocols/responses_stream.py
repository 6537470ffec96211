"""Server-sent events of the Responses API, from engine-neutral chunks.

One state object per response, fed chunks; it never parses another
protocol's output. Every event carries the next `sequence_number` and is
framed as OpenAI frames it (`event: <type>` then `data: {...}`), with no
`[DONE]` line: the terminal event ends the stream.

The sequence, as OpenAI sends it: `response.created`, `response.in_progress`;
per output item `response.output_item.added`, its parts and deltas, their
`.done` events and `response.output_item.done`; then `response.completed`
(or `response.incomplete` when the output budget ran out, or
`response.failed` when the model failed mid-stream), carrying the whole
Response with its usage. Clients such as Codex CLI act on
`response.output_item.done` and the terminal event, the SDK's stream helper
on every event, so items are always closed before the terminal event.
"""

from __future__ import annotations

from typing import Any, Literal

from serve_apps.engines.types import FinishReason, GenerationChunk, TokenUsage
from serve_apps.protocols.common import dumps, reasoning_tokens_of
from serve_apps.protocols.responses_convert import (
    ResponseEcho,
    final_status,
    function_call_item,
    item_id,
    response_object,
    usage_out,
)
from serve_apps.protocols.responses_models import (
    MessageItem,
    OutputItem,
    OutputText,
    ReasoningItem,
    ResponseStatus,
    SummaryText,
)

FAILED_MESSAGE = "The model failed while generating; you are charged only for tokens produced."


def sse_event(payload: dict[str, Any]) -> str:
    return f"event: {payload['type']}\ndata: {dumps(payload)}\n\n"


class ResponsesStreamEncoder:
    """Responses events for one response: `start`, then `chunk` per engine chunk, then `finish` or `fail`."""

    def __init__(self, echo: ResponseEcho, response_id: str, created_at: int) -> None:
        self.echo = echo
        self.response_id = response_id
        self.created_at = created_at
        self._seq = 0
        self._started = False
        self._finished = False
        self._items: list[OutputItem] = []  # done items, in output order
        self._open: Literal["reasoning", "message"] | None = None
        self._open_text = ""
        self._usage = TokenUsage()
        self._reasoning_tokens = 0
        self._finish_reason: FinishReason | None = None

    # -- framing --------------------------------------------------------------

    def _event(self, type_: str, **fields: Any) -> str:
        payload = {"type": type_, "sequence_number": self._seq, **fields}
        self._seq += 1
        return sse_event(payload)

    def _response(self, status: ResponseStatus, *, completed_at: int | None = None,
                  error: str | None = None) -> dict[str, Any]:
        final = status != "in_progress"
        return response_object(self.echo, response_id=self.response_id, created_at=self.created_at, status=status,
                               output=self._items if final else (),
                               usage=usage_out(self._usage, self._reasoning_tokens) if final else None,
                               completed_at=completed_at, error=error)

    @property
    def _index(self) -> int:
        """The output index of the open item, or of the next one."""
        return len(self._items)

    @property
    def _open_id(self) -> str:
        return item_id("rs" if self._open == "reasoning" else "msg", self.response_id, self._index)

    # -- items ----------------------------------------------------------------

    def _open_item(self, kind: Literal["reasoning", "message"]) -> list[str]:
        if self._open == kind:
            return []
        out = self._close_item()
        self._open, self._open_text = kind, ""
        iid, index = self._open_id, self._index
        if kind == "reasoning":
            item = ReasoningItem(id=iid, summary=[]).model_dump(mode="json")
            out.append(self._event("response.output_item.added", output_index=index, item=item))
            out.append(self._event("response.reasoning_summary_part.added", item_id=iid, output_index=index,
                                   summary_index=0, part={"type": "summary_text", "text": ""}))
        else:
            item = MessageItem(id=iid, status="in_progress", content=[]).model_dump(mode="json")
            out.append(self._event("response.output_item.added", output_index=index, item=item))
            out.append(self._event("response.content_part.added", item_id=iid, output_index=index, content_index=0,
                                   part=OutputText(text="").model_dump(mode="json")))
        return out

    def _close_item(self, message_status: Literal["completed", "incomplete"] = "completed") -> list[str]:
        if self._open is None:
            return []
        iid, index, text = self._open_id, self._index, self._open_text
        out: list[str] = []
        done: OutputItem
        if self._open == "reasoning":
            part = SummaryText(text=text)
            out.append(self._event("response.reasoning_summary_text.done", item_id=iid, output_index=index,
                                   summary_index=0, text=text))
            out.append(self._event("response.reasoning_summary_part.done", item_id=iid, output_index=index,
                                   summary_index=0, part=part.model_dump(mode="json")))
            done = ReasoningItem(id=iid, summary=[part])
        else:
            part_out = OutputText(text=text)
            out.append(self._event("response.output_text.done", item_id=iid, output_index=index, content_index=0,
                                   text=text, logprobs=[]))
            out.append(self._event("response.content_part.done", item_id=iid, output_index=index, content_index=0,
                                   part=part_out.model_dump(mode="json")))
            done = MessageItem(id=iid, status=message_status, content=[part_out])
        out.append(self._event("response.output_item.done", output_index=index, item=done.model_dump(mode="json")))
        self._items.append(done)
        self._open, self._open_text = None, ""
        return out

    # -- the encoder interface ------------------------------------------------

    def start(self) -> list[str]:
        if self._started:
            return []
        self._started = True
        response = self._response("in_progress")
        return [self._event("response.created", response=response),
                self._event("response.in_progress", response=response)]

    def chunk(self, chunk: GenerationChunk) -> list[str]:
        out = self.start()
        if chunk.usage is not None:
            self._reasoning_tokens += reasoning_tokens_of(chunk, self._usage)
            self._usage = chunk.usage
        if chunk.finish_reason is not None:
            self._finish_reason = chunk.finish_reason
        if chunk.reasoning:
            out += self._open_item("reasoning")
            self._open_text += chunk.reasoning
            out.append(self._event("response.reasoning_summary_text.delta", item_id=self._open_id,
                                   output_index=self._index, summary_index=0, delta=chunk.reasoning))
        if chunk.text:
            out += self._open_item("message")
            self._open_text += chunk.text
            out.append(self._event("response.output_text.delta", item_id=self._open_id, output_index=self._index,
                                   content_index=0, delta=chunk.text, logprobs=[]))
        for call in chunk.tool_calls:
            out += self._close_item()
            index, names = self._index, self.echo.tool_names
            added = function_call_item(call, names, response_id=self.response_id, output_index=index,
                                       status="in_progress")
            done = function_call_item(call, names, response_id=self.response_id, output_index=index)
            # Engines hand over whole calls, so the arguments arrive as one delta.
            out.append(self._event("response.output_item.added", output_index=index,
                                   item=added.model_dump(mode="json")))
            out.append(self._event("response.function_call_arguments.delta", item_id=done.id, output_index=index,
                                   delta=call.arguments))
            out.append(self._event("response.function_call_arguments.done", item_id=done.id, output_index=index,
                                   name=done.name, arguments=call.arguments))
            out.append(self._event("response.output_item.done", output_index=index,
                                   item=done.model_dump(mode="json")))
            self._items.append(done)
        return out

    def finish(self, completed_at: int | None = None) -> list[str]:
        """Close the open item and send the whole Response: `response.completed` or `response.incomplete`."""
        if self._finished:
            return []
        self._finished = True
        out = self.start()
        status = final_status(self._finish_reason)
        if not self._items and self._open is None:
            out += self._open_item("message")  # nothing was produced: an empty message, as the non-streamed body has
        out += self._close_item("incomplete" if status == "incomplete" else "completed")
        kind = "response.completed" if status == "completed" else "response.incomplete"
        response = self._response(status, completed_at=completed_at if status == "completed" else None)
        out.append(self._event(kind, response=response))
        return out

    def fail(self, message: str = FAILED_MESSAGE) -> str:
        """`response.failed` for a model that failed mid-stream: the items finished so far and the usage so far."""
        self._finished = True
        lines = self.start()
        lines.append(self._event("response.failed", response=self._response("failed", error=message)))
        return "".join(lines)
