"""Pure conversions between OpenAI wire models and the engine-neutral types.

No I/O and no clock: ids and `created` timestamps are arguments, so the
gateway owns them and tests can pin them.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from serve_apps.engines.types import (
    STRUCTURED_OUTPUTS,
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
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
from serve_apps.protocols.openai_models import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatFinishReason,
    ChatMessageIn,
    CompletionChoice,
    CompletionFinishReason,
    CompletionRequest,
    CompletionResponse,
    EmbeddingData,
    EmbeddingsRequest,
    EmbeddingsResponse,
    EmbeddingUsage,
    ErrorDetail,
    ErrorResponse,
    FunctionCallOut,
    ModelEntry,
    ModelList,
    ModelPricing,
    NamedToolChoice,
    PromptTokensDetails,
    ResponseFormatIn,
    ResponseMessage,
    ToolCallOut,
    Usage,
)

# The legacy completions endpoint defaults to 16 tokens in OpenAI's API; keep it.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
KNOWN_FEATURES = ("streaming", "tools", "reasoning", STRUCTURED_OUTPUTS, "embeddings")

# OpenAI's own `error.type` strings per status. 404 for an unknown model is an
# `invalid_request_error` with code `model_not_found` in OpenAI's API, and
# rate limits use the limit's unit ("requests" or "tokens") as the type with
# code `rate_limit_exceeded`; "requests" is the default here and the gateway
# passes type_="tokens" for the weekly token bar. SDKs pick their exception
# class from the status alone, so these strings are for humans and logs.
_ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "requests",
    500: "server_error",
    502: "server_error",
    503: "service_unavailable",
    504: "server_error",
}


def openai_error_type(status: int) -> str:
    if status in _ERROR_TYPES:
        return _ERROR_TYPES[status]
    return "invalid_request_error" if 400 <= status < 500 else "server_error"


def error_body(
    status: int,
    message: str,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
) -> dict[str, Any]:
    """`{"error": {message, type, code, param}}` as OpenAI sends it (code/param may be null)."""
    detail = ErrorDetail(message=message, type=type_ or openai_error_type(status), code=code, param=param)
    return ErrorResponse(error=detail).model_dump(mode="json")


def model_not_found_body(model: str) -> dict[str, Any]:
    return error_body(
        404,
        f"The model `{model}` does not exist or you do not have access to it. "
        "See GET /v1/models for the available model ids (matched exactly, case-sensitive).",
        code="model_not_found",
        param="model",
    )


# ---------------------------------------------------------------- requests


def _sampling(
    req: ChatCompletionRequest | CompletionRequest, card: ModelCard, max_tokens: int | None, default: int | None
) -> SamplingParams:
    return SamplingParams(
        max_tokens=clamp_max_tokens(max_tokens, card, default),
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        # An empty stop string would match at once; clients send them by accident.
        stop=tuple(s for s in req.stop or () if s),
        top_k=max(req.top_k or 0, 0),  # vLLM's -1 and 0 both mean off
        min_p=req.min_p or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
        min_tokens=req.min_tokens or 0,
        ignore_eos=bool(req.ignore_eos),
    )


def _message(m: ChatMessageIn) -> ChatMessage:
    calls = tuple(ToolCall(c.id, c.function.name, c.function.arguments) for c in m.tool_calls or ())
    # "developer" is OpenAI's new name for the system role; engines only know "system".
    role = "system" if m.role == "developer" else m.role
    return ChatMessage(role=role, content=m.text, tool_calls=calls, tool_call_id=m.tool_call_id, name=m.name)


def chat_to_generation(req: ChatCompletionRequest, request_id: str, card: ModelCard) -> GenerationRequest:
    """Raises `InvalidRequest` for a tool_choice that the tools cannot satisfy."""
    tools = tuple(
        ToolSpec(t.function.name, t.function.description or "", t.function.parameters or {}) for t in req.tools or ()
    )
    choice: str | dict[str, Any] | None
    if isinstance(req.tool_choice, NamedToolChoice):
        name = req.tool_choice.function.name
        if name not in {t.name for t in tools}:
            raise InvalidRequest(f"tool_choice names the function '{name}', which is not in 'tools'.", "tool_choice")
        choice = {"name": name}
    else:
        choice = req.tool_choice
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs at least one entry in 'tools'.", "tool_choice")
    return GenerationRequest(
        request_id=request_id,
        model=req.model,
        sampling=_sampling(req, card, req.output_limit, None),
        messages=tuple(_message(m) for m in req.messages),
        tools=tools,
        tool_choice=choice,
        output_format=_output_format(req.response_format, card),
    )


def _output_format(fmt: ResponseFormatIn | None, card: ModelCard) -> OutputFormat | None:
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
    # json_schema without a schema: any JSON object, as OpenAI does.
    wanted = OutputFormat("json_schema", schema) if schema else OutputFormat("json_object")
    return supported_output_format(wanted, card, "response_format", f"response_format '{fmt.type}'")


def completion_to_generation(req: CompletionRequest, request_id: str, card: ModelCard) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model=req.model,
        sampling=_sampling(req, card, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS),
        prompt=req.prompt[0],
    )


def embeddings_to_request(req: EmbeddingsRequest, request_id: str, dim: int | None = None) -> EmbeddingRequest:
    """`dim` is the model's native size; a different `dimensions` is refused, not silently ignored."""
    if req.dimensions is not None and dim is not None and req.dimensions != dim:
        raise InvalidRequest(f"This model only produces {dim}-dimensional embeddings.", "dimensions")
    return EmbeddingRequest(request_id=request_id, model=req.model, inputs=tuple(req.input))


# ---------------------------------------------------------------- responses


def usage_model(usage: TokenUsage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
    )


def chat_finish_reason(reason: FinishReason | None, has_tool_calls: bool = False) -> ChatFinishReason:
    """OpenAI has no "abort"/"error" finish reason; those streams ended early, so "stop"."""
    if reason == "tool_calls" or (has_tool_calls and reason in (None, "stop")):
        return "tool_calls"
    if reason == "length":
        return "length"
    return "stop"


def completion_finish_reason(reason: FinishReason | None) -> CompletionFinishReason:
    return "length" if reason == "length" else "stop"


def tool_call_out(call: ToolCall) -> ToolCallOut:
    return ToolCallOut(id=call.id, function=FunctionCallOut(name=call.name, arguments=call.arguments))


def chat_response(result: GenerationResult, *, response_id: str, model: str, created: int) -> dict[str, Any]:
    """A `chat.completion` body; `content` is null only when the model only called tools."""
    message = ResponseMessage(
        content=result.text if (result.text or not result.tool_calls) else None,
        reasoning_content=result.reasoning or None,
        tool_calls=[tool_call_out(c) for c in result.tool_calls] or None,
    )
    body = ChatCompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[
            ChatChoice(
                message=message,
                finish_reason=chat_finish_reason(result.finish_reason, bool(result.tool_calls)),
            )
        ],
        usage=usage_model(result.usage),
    )
    return body.model_dump(mode="json")


def completion_response(result: GenerationResult, *, response_id: str, model: str, created: int) -> dict[str, Any]:
    body = CompletionResponse(
        id=response_id,
        created=created,
        model=model,
        choices=[CompletionChoice(text=result.text, finish_reason=completion_finish_reason(result.finish_reason))],
        usage=usage_model(result.usage),
    )
    return body.model_dump(mode="json")


def _base64_floats(vector: Sequence[float]) -> str:
    # OpenAI's base64 format is little-endian float32, which the SDK decodes with numpy.
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode("ascii")


def embeddings_response(result: EmbeddingResult, *, model: str, encoding_format: str = "float") -> dict[str, Any]:
    data = [
        EmbeddingData(index=i, embedding=_base64_floats(v) if encoding_format == "base64" else list(v))
        for i, v in enumerate(result.vectors)
    ]
    usage = EmbeddingUsage(prompt_tokens=result.prompt_tokens, total_tokens=result.prompt_tokens)
    return EmbeddingsResponse(data=data, model=model, usage=usage).model_dump(mode="json")


def format_usd(micro: int) -> str:
    """Micro-dollars as "$1.20": at least two decimals, more only when needed ($0.075)."""
    text = f"{Decimal(micro) / Decimal(1_000_000):.6f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


def models_list(
    cards: Iterable[ModelCard],
    weights: Mapping[str, float],
    warm: Mapping[str, bool] | None = None,
    created: int = 0,
) -> dict[str, Any]:
    """The `GET /models` body. A metered model missing from `weights`, or any model
    missing from `warm`, omits that field rather than showing a made-up value."""
    entries = []
    for card in cards:
        features = {f: f in card.features for f in KNOWN_FEATURES}
        features.update({f: True for f in card.features})
        if card.kind == "embeddings":
            features["embeddings"] = True
        entries.append(
            ModelEntry(
                id=card.id,
                created=created,
                owned_by=card.owned_by,
                kind=card.kind,
                pricing=ModelPricing(
                    input_per_million=format_usd(card.input_price_micro),
                    output_per_million=format_usd(card.output_price_micro),
                    input_per_million_usd=card.input_price_micro / 1_000_000,
                    output_per_million_usd=card.output_price_micro / 1_000_000,
                    input_micro_per_million=card.input_price_micro,
                    output_micro_per_million=card.output_price_micro,
                ),
                context_length=card.context_length,
                max_output_tokens=card.max_output_tokens,
                request_weight=weights.get(card.id, 0.0 if card.size_class == "unmetered" else None),
                size_class=card.size_class,
                features=features,
                base_model=card.base_model,
                warm=None if warm is None else warm.get(card.id),
            )
        )
    return ModelList(data=entries).model_dump(mode="json")
