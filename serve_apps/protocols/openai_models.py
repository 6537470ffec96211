"""OpenAI wire models: chat completions, completions, embeddings, models, errors.

Requests ignore unknown fields because the official SDKs keep adding new
ones and a server that rejects them breaks every client upgrade. Fields that
accept several shapes (`content`, `stop`, `prompt`, `input`, `tool_choice`)
are normalised by a before-validator, so an error names the field with one
clear sentence instead of pydantic's per-union-member noise.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pydantic
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from serve_apps.protocols.common import ResponseModel as _Response
from serve_apps.protocols.common import describe_validation_error

_UNSUPPORTED_PARTS = {"image_url", "input_audio", "file", "image", "audio"}


def validation_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    """(message, param) for an OpenAI 400 body, param like `messages[1].content`."""
    return describe_validation_error(exc, index_style="brackets")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- requests


class TextPart(_Request):
    type: Literal["text"] = "text"
    text: str


def _content_parts(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return None if value is None else [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValueError("must be a string or an array of content parts")
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        kind = kind if isinstance(kind, str) else None  # a list or object here must not reach a set lookup
        if kind in _UNSUPPORTED_PARTS:
            raise ValueError(
                f"content part {i} has type '{kind}', but this server accepts text only; "
                "send images, audio and files as text or use a multimodal deployment"
            )
        if kind != "text":
            raise ValueError(f"content part {i} must be an object with type 'text'")
        if not isinstance(part.get("text"), str):
            raise ValueError(f"content part {i} needs a string 'text'")
    return value


class FunctionCallIn(_Request):
    name: str
    arguments: str

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_as_text(cls, value: Any) -> Any:
        # Some clients echo back parsed arguments; the wire format is JSON text.
        return json.dumps(value) if isinstance(value, dict) else value


class ToolCallIn(_Request):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    _parts = field_validator("content", mode="before")(_content_parts)

    @model_validator(mode="after")
    def _role_rules(self) -> ChatMessageIn:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages may carry 'tool_calls'")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    @property
    def text(self) -> str:
        return "\n".join(p.text for p in self.content or ())


class FunctionDef(_Request):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedFunction


ToolChoiceIn = Literal["none", "auto", "required"] | NamedToolChoice


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict):
        fn = value.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return value
    raise ValueError('must be \'none\', \'auto\', \'required\' or {"type": "function", "function": {"name": ...}}')


def _stop_list(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or an array of strings")


class StreamOptions(_Request):
    include_usage: bool = False


def _only_one_choice(value: int | None) -> int | None:
    if value is not None and value != 1:
        raise ValueError("only n=1 is supported")
    return value


class _SamplingFields(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    n: int | None = None
    stop: list[str] | None = Field(default=None, max_length=16)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    # Not OpenAI's, but vLLM's own server takes them and clients send them (in `extra_body`).
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=2)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    _n = field_validator("n")(_only_one_choice)
    _stop = field_validator("stop", mode="before")(_stop_list)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class JsonSchemaIn(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormatIn(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaIn | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormatIn:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object with 'name' and 'schema'")
        return self


def _no_logprobs(value: Any) -> Any:
    if value:
        raise ValueError("logprobs are not supported")
    return value


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessageIn] = Field(min_length=1)
    response_format: ResponseFormatIn | None = None
    # Refused rather than ignored: a client that asks for them reads them.
    logprobs: bool | None = None
    top_logprobs: int | None = None

    _logprobs = field_validator("logprobs", "top_logprobs")(_no_logprobs)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None

    _tool_choice = field_validator("tool_choice", mode="before")(_tool_choice)

    @property
    def output_limit(self) -> int | None:
        # max_completion_tokens superseded max_tokens; honour it when both are sent.
        return self.max_completion_tokens or self.max_tokens


def _single_prompt(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        if any(isinstance(p, int | list) for p in value):
            raise ValueError("token-id prompts are not supported; send the prompt as a string")
        if len(value) != 1:
            raise ValueError("send exactly one prompt per request")
        return value
    raise ValueError("must be a string")


class CompletionRequest(_SamplingFields):
    prompt: list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    _logprobs = field_validator("logprobs")(_no_logprobs)

    _prompt = field_validator("prompt", mode="before")(_single_prompt)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix is not supported")
        return value

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError("only best_of=1 is supported")
        return value


def _embedding_inputs(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("must be a non-empty string or array of strings")
    for i, item in enumerate(value):
        if isinstance(item, int | list):
            raise ValueError("token-id inputs are not supported; send strings")
        if not isinstance(item, str) or not item:
            raise ValueError(f"item {i} must be a non-empty string")
    return value


class EmbeddingsRequest(_Request):
    model: str = Field(min_length=1)
    input: list[str] = Field(max_length=2048)
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None

    _input = field_validator("input", mode="before")(_embedding_inputs)


# ---------------------------------------------------------------- responses


class PromptTokensDetails(_Response):
    cached_tokens: int


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # Always present, 0 included: clients compute cache discounts from it.
    prompt_tokens_details: PromptTokensDetails


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ResponseMessage(_Response):
    keep_null = frozenset({"content"})
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


ChatFinishReason = Literal["stop", "length", "tool_calls"]
CompletionFinishReason = Literal["stop", "length"]


class ChatChoice(_Response):
    keep_null = frozenset({"logprobs"})
    index: int = 0
    message: ResponseMessage
    finish_reason: ChatFinishReason
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class DeltaFunction(_Response):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class ChunkDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(_Response):
    keep_null = frozenset({"finish_reason", "logprobs"})
    index: int = 0
    delta: ChunkDelta
    finish_reason: ChatFinishReason | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionChoice(_Response):
    keep_null = frozenset({"finish_reason", "logprobs"})
    index: int = 0
    text: str
    finish_reason: CompletionFinishReason | None = None
    logprobs: None = None


class CompletionResponse(_Response):
    """Both the non-streamed body and each streamed chunk (OpenAI uses one shape)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class EmbeddingData(_Response):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str when encoding_format == "base64"


class EmbeddingUsage(_Response):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(_Response):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: EmbeddingUsage


class ModelPricing(_Response):
    currency: Literal["USD"] = "USD"
    input_per_million: str  # "$1.20", for people
    output_per_million: str
    input_per_million_usd: float  # for programs
    output_per_million_usd: float
    input_micro_per_million: int  # exact, as the catalog stores it
    output_micro_per_million: int


class ModelEntry(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    kind: Literal["chat", "embeddings", "lora"]
    pricing: ModelPricing
    context_length: int
    max_output_tokens: int
    request_weight: float | None = None
    size_class: Literal["standard", "small", "unmetered"]
    features: dict[str, bool]
    base_model: str | None = None
    warm: bool | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelEntry]


class ErrorDetail(_Response):
    keep_null = frozenset({"code", "param"})
    message: str
    type: str
    code: str | None = None
    param: str | None = None


class ErrorResponse(_Response):
    error: ErrorDetail
