"""Pure conversions between Anthropic Messages wire models and the engine-neutral types."""

from __future__ import annotations

import json
from typing import Any

from serve_apps.engines.types import (
    ChatMessage,
    FinishReason,
    GenerationRequest,
    ModelCard,
    OutputFormat,
    SamplingParams,
    TokenUsage,
    ToolCall,
    ToolSpec,
)
from serve_apps.protocols.anthropic_models import (
    ContentBlockIn,
    ContentBlockOut,
    CountTokensRequest,
    ErrorDetail,
    ErrorResponse,
    MessageIn,
    MessageOut,
    MessagesRequest,
    MessageTokensCount,
    StopReason,
    TextBlockOut,
    ThinkingBlockOut,
    ToolUseBlockOut,
    UsageOut,
)
from serve_apps.protocols.common import GenerationResult, InvalidRequest, clamp_max_tokens, supported_output_format

_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def error_body(status: int, message: str, type_: str | None = None) -> dict[str, Any]:
    """`{"type": "error", "error": {type, message}}`, the shape the Anthropic SDK parses."""
    detail = ErrorDetail(type=type_ or anthropic_error_type(status), message=message)
    return ErrorResponse(error=detail).model_dump(mode="json")


def model_not_found_body(model: str) -> dict[str, Any]:
    return error_body(
        404,
        f"model: {model} was not found. See GET /v1/models for the available model ids "
        "(matched exactly, case-sensitive).",
    )


# ---------------------------------------------------------------- requests


def _turns(message: MessageIn) -> list[ChatMessage]:
    if message.role == "assistant":
        texts: list[str] = []
        calls: list[ToolCall] = []
        for block in message.content:
            if block.type == "text" and block.text is not None:
                texts.append(block.text)
            elif block.type == "tool_use" and block.id and block.name:
                calls.append(ToolCall(block.id, block.name, json.dumps(block.input or {})))
        return [ChatMessage(role="assistant", content="\n".join(texts), tool_calls=tuple(calls))]

    # A user turn may interleave tool results and text; each result becomes its
    # own "tool" message and text runs between them stay in order.
    out: list[ChatMessage] = []
    pending: list[str] = []
    for block in message.content:
        if block.type == "text" and block.text is not None:
            pending.append(block.text)
        elif block.type == "tool_result":
            if pending:
                out.append(ChatMessage(role="user", content="\n".join(pending)))
                pending = []
            text = block.result_text
            out.append(
                ChatMessage(
                    role="tool",
                    content=f"Error: {text}" if block.is_error else text,
                    tool_call_id=block.tool_use_id,
                )
            )
    if pending or not out:
        out.append(ChatMessage(role="user", content="\n".join(pending)))
    return out


def system_reminder(text: str) -> str:
    return f"<system-reminder>\n{text}\n</system-reminder>"


def _fold_system_messages(messages: list[MessageIn]) -> list[MessageIn]:
    """Mid-conversation `system` messages become `<system-reminder>` text in a user turn.

    Most open models' chat templates accept a system message only first, so
    each one is appended to the user turn before it, else prepended to the
    user turn after it, else (between two assistant turns, or alone) becomes a
    user turn of its own. That is also what Claude Code itself does when a
    server refuses the role, so the model sees the same prompt either way.
    """
    out: list[MessageIn] = []
    carried: list[ContentBlockIn] = []  # reminders waiting for the next user turn
    for i, m in enumerate(messages):
        if m.role != "system":
            if carried and m.role == "user":
                m = m.model_copy(update={"content": [*carried, *m.content]})
                carried = []
            elif carried:
                out.append(MessageIn(role="user", content=carried))
                carried = []
            out.append(m)
            continue
        reminder = ContentBlockIn(type="text", text=system_reminder("\n".join(b.text or "" for b in m.content)))
        if out and out[-1].role == "user":
            out[-1] = out[-1].model_copy(update={"content": [*out[-1].content, reminder]})
        elif i + 1 < len(messages) and messages[i + 1].role in ("user", "system"):
            carried.append(reminder)
        else:
            out.append(MessageIn(role="user", content=[reminder]))
    if carried:
        out.append(MessageIn(role="user", content=carried))
    return out


def prompt_parts(req: MessagesRequest | CountTokensRequest) -> tuple[tuple[ChatMessage, ...], tuple[ToolSpec, ...]]:
    """The engine-neutral messages and tools of a request; also what count_tokens needs."""
    messages: list[ChatMessage] = []
    if req.system:
        messages.append(ChatMessage(role="system", content="\n".join(b.text for b in req.system)))
    for m in _fold_system_messages(req.messages):
        messages.extend(_turns(m))
    tools = tuple(ToolSpec(t.name, t.description or "", t.input_schema) for t in req.tools or ())
    return tuple(messages), tools


def _tool_choice(req: MessagesRequest, tools: tuple[ToolSpec, ...]) -> str | dict[str, Any] | None:
    choice = req.tool_choice
    if choice is None:
        return None
    if choice.type == "tool":
        if choice.name not in {t.name for t in tools}:
            raise InvalidRequest(f"tool_choice: tool '{choice.name}' is not in tools", "tool_choice")
        return {"name": choice.name}
    if choice.type == "any":
        if not tools:
            raise InvalidRequest("tool_choice: type 'any' needs at least one tool", "tool_choice")
        return "required"
    return choice.type  # "auto" and "none" mean the same in the engine-neutral form


def messages_to_generation(req: MessagesRequest, request_id: str, card: ModelCard) -> GenerationRequest:
    """Raises `InvalidRequest` for a tool_choice the tools cannot satisfy."""
    messages, tools = prompt_parts(req)
    return GenerationRequest(
        request_id=request_id,
        model=req.model,
        sampling=SamplingParams(
            max_tokens=clamp_max_tokens(req.max_tokens, card),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            stop=tuple(s for s in req.stop_sequences or () if s),
            top_k=req.top_k or 0,
        ),
        messages=messages,
        tools=tools,
        tool_choice=_tool_choice(req, tools),
        output_format=_output_format(req, card),
    )


def _output_format(req: MessagesRequest, card: ModelCard) -> OutputFormat | None:
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is None:
        return None
    return supported_output_format(OutputFormat("json_schema", fmt.schema_), card, "output_config.format",
                                   "output_config.format (structured outputs)")


def count_tokens_body(input_tokens: int) -> dict[str, Any]:
    return MessageTokensCount(input_tokens=input_tokens).model_dump(mode="json")


# ---------------------------------------------------------------- responses


def stop_reason(finish: FinishReason | None, stop_sequence: str | None = None) -> StopReason:
    """Anthropic has no "abort"/"error" stop reason; those ended early, reported as end_turn."""
    if finish == "length":
        return "max_tokens"
    if finish == "tool_calls":
        return "tool_use"
    if finish == "stop" and stop_sequence:
        return "stop_sequence"
    return "end_turn"


def usage_out(usage: TokenUsage) -> UsageOut:
    return UsageOut(
        input_tokens=usage.uncached_prompt_tokens,
        cache_creation_input_tokens=0,
        cache_read_input_tokens=usage.cached_tokens,
        output_tokens=usage.completion_tokens,
    )


def tool_input(arguments: str) -> dict[str, Any]:
    """Parsed tool arguments; text that is not a JSON object is kept under `_raw`
    rather than dropped, so a malformed call is visible to the client."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except json.JSONDecodeError:
        return {"_raw": arguments}
    return value if isinstance(value, dict) else {"_raw": arguments}


def message_response(result: GenerationResult, *, message_id: str, model: str) -> dict[str, Any]:
    content: list[ContentBlockOut] = []
    if result.reasoning:
        content.append(ThinkingBlockOut(thinking=result.reasoning))
    if result.text or not result.tool_calls:
        content.append(TextBlockOut(text=result.text))
    content.extend(ToolUseBlockOut(id=c.id, name=c.name, input=tool_input(c.arguments)) for c in result.tool_calls)
    reason = stop_reason(result.finish_reason, result.stop_sequence)
    body = MessageOut(
        id=message_id,
        model=model,
        content=content,
        stop_reason=reason,
        stop_sequence=result.stop_sequence if reason == "stop_sequence" else None,
        usage=usage_out(result.usage),
    )
    return body.model_dump(mode="json")
