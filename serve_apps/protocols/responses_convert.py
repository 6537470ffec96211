"""Pure conversions between the Responses API wire models and the engine-neutral types.

No I/O and no clock: the response id and timestamps are arguments, so the
gateway owns them and tests can pin them.

Namespaced functions (Codex CLI groups some tools in `namespace` tools) reach
the engine as one flat function list: a function `f` of namespace `ns` is
offered as `ns.f`, the form OpenAI's own tool prompts use, and a call of
`ns.f` comes back as a `function_call` item with `namespace: "ns"` and
`name: "f"`, which is how the client sent it and will send it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
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
from serve_apps.protocols.common import GenerationResult, InvalidRequest, clamp_max_tokens, supported_output_format
from serve_apps.protocols.responses_models import (
    FunctionCallItem,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    MessageItem,
    NamedToolChoiceIn,
    OutputItem,
    OutputText,
    OutputTokensDetails,
    ReasoningItem,
    ResponseErrorOut,
    ResponseObject,
    ResponsesRequest,
    ResponseStatus,
    ResponseUsageOut,
    SummaryText,
    TextFormatIn,
)

NO_STORE = ("packserve stores no prompts or completions, so there is no {what} to continue; send the whole "
            "conversation in 'input' (as Codex CLI does with 'store': false).")

# Where a flat engine tool name came from: (namespace or None, the name the client knows).
ToolNames = Mapping[str, tuple[str | None, str]]


def engine_tool_name(namespace: str | None, name: str) -> str:
    return f"{namespace}.{name}" if namespace else name


# ---------------------------------------------------------------- requests


def _refuse_stateful(req: ResponsesRequest) -> None:
    if req.previous_response_id is not None:
        raise InvalidRequest(NO_STORE.format(what=f"previous response '{req.previous_response_id}'"),
                             "previous_response_id")
    if req.conversation is not None:
        raise InvalidRequest(NO_STORE.format(what="conversation"), "conversation")
    if req.background:
        raise InvalidRequest("Background responses are not supported: they are fetched later by id, and "
                             "packserve stores no responses. Stream the response instead.", "background")
    if req.prompt is not None:
        raise InvalidRequest("Stored prompt templates are not supported; send the prompt text in 'instructions' "
                             "and 'input'.", "prompt")


def tools_and_names(req: ResponsesRequest) -> tuple[tuple[ToolSpec, ...], dict[str, tuple[str | None, str]]]:
    """The flat function list the engine is offered, and where each flat name came from."""
    specs: list[ToolSpec] = []
    names: dict[str, tuple[str | None, str]] = {}
    for tool in req.offered_tools:
        if tool.type == "namespace":
            for fn in tool.tools or ():
                flat = engine_tool_name(tool.name, fn.name)
                specs.append(ToolSpec(flat, fn.description or "", fn.parameters or {}))
                names[flat] = (tool.name, fn.name)
        else:
            name = tool.name or ""
            specs.append(ToolSpec(name, tool.description or "", tool.parameters or {}))
            names[name] = (None, name)
    return tuple(specs), names


def _tool_choice(req: ResponsesRequest, names: ToolNames) -> str | dict[str, Any] | None:
    choice = req.tool_choice
    if isinstance(choice, NamedToolChoiceIn):
        if choice.name in names:
            return {"name": choice.name}
        # A plain name picks the namespaced function of that name, if exactly one has it.
        matches = [flat for flat, (_, plain) in names.items() if plain == choice.name]
        if len(matches) != 1:
            raise InvalidRequest(f"tool_choice names the function '{choice.name}', which is not in 'tools'.",
                                 "tool_choice")
        return {"name": matches[0]}
    if choice == "required" and not names:
        raise InvalidRequest("tool_choice 'required' needs at least one function in 'tools'.", "tool_choice")
    return choice


def _messages(req: ResponsesRequest) -> tuple[ChatMessage, ...]:
    """Items as chat turns: an assistant message and the function calls right after it are one turn.

    One item is one chat message otherwise (no merging of neighbours), so a
    conversation costs the same tokens here as sent to chat completions.
    """
    out: list[ChatMessage] = []
    if req.instructions:
        out.append(ChatMessage(role="system", content=req.instructions))
    turn_text: str | None = None  # the assistant turn being gathered, if any
    turn_calls: list[ToolCall] = []

    def flush() -> None:
        nonlocal turn_text, turn_calls
        if turn_text is not None or turn_calls:
            out.append(ChatMessage(role="assistant", content=turn_text or "", tool_calls=tuple(turn_calls)))
        turn_text, turn_calls = None, []

    for item in req.input:
        if item.dropped:
            continue
        if item.type == "function_call":
            turn_calls.append(ToolCall(item.call_id or "", engine_tool_name(item.namespace, item.name or ""),
                                       item.arguments or ""))
            if turn_text is None:
                turn_text = ""
            continue
        flush()
        if item.type == "message" and item.role == "assistant":
            turn_text = item.text
        elif item.type == "message":
            # "developer" is OpenAI's new name for the system role; engines only know "system".
            role = "system" if item.role == "developer" else item.role or "user"
            out.append(ChatMessage(role=role, content=item.text))
        elif item.type == "function_call_output":
            out.append(ChatMessage(role="tool", content=item.output_text, tool_call_id=item.call_id))
    flush()
    if not any(m.role != "system" for m in out):
        raise InvalidRequest("'input' holds no message or function call output for the model to answer.", "input")
    return tuple(out)


def _output_format(fmt: TextFormatIn | None, card: ModelCard) -> OutputFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    # json_schema without a schema: any JSON object, as OpenAI does.
    wanted = OutputFormat("json_schema", fmt.schema_) if fmt.schema_ else OutputFormat("json_object")
    return supported_output_format(wanted, card, "text.format", f"text.format '{fmt.type}'")


def responses_to_generation(req: ResponsesRequest, request_id: str, card: ModelCard) -> GenerationRequest:
    """Raises `InvalidRequest` for what needs stored state or cannot be served as asked."""
    _refuse_stateful(req)
    tools, names = tools_and_names(req)
    return GenerationRequest(
        request_id=request_id,
        model=req.model,
        sampling=SamplingParams(
            max_tokens=clamp_max_tokens(req.max_output_tokens, card),
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
        ),
        messages=_messages(req),
        tools=tools,
        tool_choice=_tool_choice(req, names),
        output_format=_output_format(req.text.format if req.text else None, card),
    )


# ---------------------------------------------------------------- responses


@dataclass(frozen=True)
class ResponseEcho:
    """The request's settings as every Response object of it repeats them (built once per request)."""

    model: str
    fields: Mapping[str, Any]
    tool_names: ToolNames


def response_echo(req: ResponsesRequest) -> ResponseEcho:
    _, names = tools_and_names(req)
    text: dict[str, Any] = {"format": {"type": "text"}}
    if req.text is not None:
        if req.text.format is not None:
            text["format"] = req.text.format.model_dump(mode="json", by_alias=True, exclude_none=True)
        if req.text.verbosity is not None:
            text["verbosity"] = req.text.verbosity
    choice = req.tool_choice
    reasoning = None
    if req.reasoning is not None:
        reasoning = {"effort": req.reasoning.effort, "summary": req.reasoning.summary or req.reasoning.generate_summary}
    fields: dict[str, Any] = {
        "instructions": req.instructions,
        "max_output_tokens": req.max_output_tokens,
        "model": req.model,
        "parallel_tool_calls": True if req.parallel_tool_calls is None else req.parallel_tool_calls,
        "reasoning": reasoning,
        "temperature": 1.0 if req.temperature is None else req.temperature,
        "text": text,
        "tool_choice": choice.model_dump(mode="json") if isinstance(choice, NamedToolChoiceIn) else choice or "auto",
        "tools": [t.echo() for t in req.offered_tools],
        "top_p": 1.0 if req.top_p is None else req.top_p,
        "truncation": req.truncation or "disabled",
        "user": req.user,
        "metadata": dict(req.metadata or {}),
        "prompt_cache_key": req.prompt_cache_key,
    }
    return ResponseEcho(req.model, fields, names)


def item_id(prefix: str, response_id: str, output_index: int) -> str:
    """Output item ids: unique per response and index (`msg_…`, `fc_…`, `rs_…`, as OpenAI names them)."""
    return f"{prefix}_{response_id.partition('_')[2]}{output_index:03d}"


def function_call_item(call: ToolCall, names: ToolNames, *, response_id: str, output_index: int,
                       status: ItemStatus = "completed") -> FunctionCallItem:
    """The call as an output item; while `in_progress` its arguments are still to come (as deltas)."""
    namespace, name = names.get(call.name, (None, call.name))
    return FunctionCallItem(id=item_id("fc", response_id, output_index), call_id=call.id, name=name,
                            namespace=namespace, arguments=call.arguments if status != "in_progress" else "",
                            status=status)


def usage_out(usage: TokenUsage, reasoning_tokens: int) -> ResponseUsageOut:
    return ResponseUsageOut(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=usage.cached_tokens),
        output_tokens=usage.completion_tokens,
        output_tokens_details=OutputTokensDetails(reasoning_tokens=reasoning_tokens),
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def final_status(reason: FinishReason | None) -> ResponseStatus:
    """`length` is the only early stop a client can act on (raise max_output_tokens); the rest completed."""
    return "incomplete" if reason == "length" else "completed"


def response_object(echo: ResponseEcho, *, response_id: str, created_at: int, status: ResponseStatus,
                    output: Sequence[OutputItem] = (), usage: ResponseUsageOut | None = None,
                    completed_at: int | None = None, error: str | None = None) -> dict[str, Any]:
    body = ResponseObject(
        id=response_id,
        created_at=created_at,
        status=status,
        completed_at=completed_at,
        error=ResponseErrorOut(code="server_error", message=error) if error is not None else None,
        incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
        output=list(output),
        usage=usage,
        **echo.fields,
    )
    return body.model_dump(mode="json")


def output_items(result: GenerationResult, names: ToolNames, *, response_id: str) -> list[OutputItem]:
    """Reasoning, then the message, then the function calls, in the order a model produces them."""
    items: list[OutputItem] = []
    status = final_status(result.finish_reason)
    if result.reasoning:
        items.append(ReasoningItem(id=item_id("rs", response_id, len(items)),
                                   summary=[SummaryText(text=result.reasoning)]))
    if result.text or not (result.tool_calls or result.reasoning):
        items.append(MessageItem(id=item_id("msg", response_id, len(items)), content=[OutputText(text=result.text)],
                                 status="incomplete" if status == "incomplete" else "completed"))
    for call in result.tool_calls:
        items.append(function_call_item(call, names, response_id=response_id, output_index=len(items)))
    return items


def responses_response(result: GenerationResult, echo: ResponseEcho, *, response_id: str, created_at: int,
                       completed_at: int) -> dict[str, Any]:
    """The non-streamed Response body."""
    status = final_status(result.finish_reason)
    return response_object(
        echo, response_id=response_id, created_at=created_at, status=status,
        output=output_items(result, echo.tool_names, response_id=response_id),
        usage=usage_out(result.usage, result.reasoning_tokens),
        completed_at=completed_at if status == "completed" else None)

