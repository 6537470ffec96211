"""OpenAI Responses API wire models: the request, the Response object, its output items, stream events.

Requests ignore unknown fields, as the other protocols do: Codex CLI and the
SDKs keep adding fields (`client_metadata`, `text.verbosity`, ...), and a
server that rejects them breaks every client upgrade. Input items and
content parts are permissive models checked per `type`, so an unsupported
kind (an image, an `item_reference`) gets one sentence naming its position
instead of a discriminated-union error listing every item kind.

What packserve cannot honour is refused with a 400 here or in the converter,
never silently ignored when the client would read the result: stored
conversation state (`previous_response_id`, `conversation`, `background`,
`item_reference`), logprobs, non-text content, and tools that only OpenAI's
servers can run. The one exception is the `web_search` tool, which Codex CLI
sends on every request: it is dropped (the model is never offered it), see
`DROPPED_TOOL_TYPES`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_apps.protocols.common import ResponseModel as _Response
from serve_apps.protocols.common import describe_validation_error

# Hosted tools packserve has no server to run. `web_search` is dropped rather
# than refused: Codex CLI offers it on every request (even with
# `external_web_access: false`), and a model that is never offered it simply
# answers without searching, which is what the client gets from any model
# that chooses not to search.
DROPPED_TOOL_TYPES = frozenset({"web_search", "web_search_preview", "web_search_2025_08_26",
                                "web_search_preview_2025_03_11"})
_TEXT_PARTS = frozenset({"input_text", "output_text", "text", "refusal"})
_MEDIA_PARTS = frozenset({"input_image", "input_file", "input_audio", "image_url", "image", "file"})
# Sent back by clients that keep their own history (Codex with `store: false`);
# accepted and left out of the prompt, as chat templates drop earlier reasoning.
_DROPPED_ITEMS = frozenset({"reasoning"})
_STATEFUL_ITEMS = frozenset({"item_reference"})


def validation_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    """(message, param) for an OpenAI 400 body, param like `input[2].content`."""
    return describe_validation_error(exc, index_style="brackets")


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ---------------------------------------------------------------- request


class ContentPartIn(_Request):
    """One part of a message's content; only text kinds are accepted."""

    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> ContentPartIn:
        if self.type in _MEDIA_PARTS:
            raise ValueError(f"content parts of type '{self.type}' are not supported; this server accepts text "
                             "only (send files and images as text, or use a multimodal deployment)")
        if self.type not in _TEXT_PARTS:
            raise ValueError(f"unknown content part type '{self.type}'; expected 'input_text' or 'output_text'")
        if self.type == "refusal":
            if self.refusal is None:
                raise ValueError("a 'refusal' part needs 'refusal'")
        elif self.text is None:
            raise ValueError(f"an '{self.type}' part needs 'text'")
        return self

    @property
    def value(self) -> str:
        return (self.refusal if self.type == "refusal" else self.text) or ""


def _parts(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "input_text", "text": value}]
    return value


class InputItem(_Request):
    """Any input item; `_check` enforces the fields its `type` needs.

    A message may leave out `type` (the SDK's EasyInputMessage). Ids and
    statuses that clients echo back (Codex gives every item an `id`) are
    accepted and not needed.
    """

    type: str = "message"
    id: str | None = None
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: list[ContentPartIn] | None = None
    call_id: str | None = None
    name: str | None = None
    namespace: str | None = None
    arguments: str | None = None
    output: list[ContentPartIn] | None = None
    status: str | None = None

    _content = field_validator("content", "output", mode="before")(_parts)

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments_as_text(cls, value: Any) -> Any:
        # Some clients echo parsed arguments back; the wire format is JSON text.
        return json.dumps(value) if isinstance(value, dict) else value

    @model_validator(mode="after")
    def _check(self) -> InputItem:
        kind = self.type
        if kind == "message":
            if self.role is None:
                raise ValueError("a message item needs 'role' (user, assistant, system or developer)")
            if self.content is None:
                raise ValueError("a message item needs 'content'")
        elif kind == "function_call":
            if not self.call_id or not self.name or self.arguments is None:
                raise ValueError("a function_call item needs 'call_id', 'name' and 'arguments'")
        elif kind == "function_call_output":
            if not self.call_id or self.output is None:
                raise ValueError("a function_call_output item needs 'call_id' and 'output'")
        elif kind in _STATEFUL_ITEMS:
            raise ValueError("packserve stores no responses, so an 'item_reference' cannot be resolved; "
                             "send the item itself")
        elif kind not in _DROPPED_ITEMS:
            raise ValueError(f"input items of type '{kind}' are not supported; send messages, function_call "
                             "and function_call_output items")
        return self

    @property
    def dropped(self) -> bool:
        """Accepted, and left out of the prompt."""
        return self.type in _DROPPED_ITEMS

    @property
    def text(self) -> str:
        return "".join(p.value for p in self.content or ())

    @property
    def output_text(self) -> str:
        return "".join(p.value for p in self.output or ())


def _input_items(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "message", "role": "user", "content": value}]
    if isinstance(value, list) and not value:
        raise ValueError("must be a non-empty string or array of input items")
    return value


class FunctionToolIn(_Request):
    type: Literal["function"] = "function"
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolIn(_Request):
    """A tool of any type; `_check` keeps what packserve can offer the model."""

    type: str
    name: str | None = None
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None
    tools: list[FunctionToolIn] | None = None  # a namespace's functions

    @field_validator("tools", mode="before")
    @classmethod
    def _namespace_functions(cls, value: Any) -> Any:
        if isinstance(value, list):
            for i, tool in enumerate(value):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind != "function":
                    raise ValueError(f"tool {i} of the namespace has type '{kind}'; namespaces may hold only "
                                     "function tools here")
        return value

    @model_validator(mode="after")
    def _check(self) -> ToolIn:
        if self.type == "function":
            if not self.name:
                raise ValueError("a function tool needs 'name'")
        elif self.type == "namespace":
            if not self.name or not self.tools:
                raise ValueError("a namespace tool needs 'name' and a non-empty 'tools' list")
        elif self.type not in DROPPED_TOOL_TYPES:
            raise ValueError(f"tools of type '{self.type}' run on OpenAI's servers and are not available here; "
                             "offer them as function tools your client runs")
        return self

    @property
    def dropped(self) -> bool:
        return self.type in DROPPED_TOOL_TYPES

    def echo(self) -> dict[str, Any]:
        """The tool as the Response object lists it (what the model was offered)."""
        if self.type == "namespace":
            return {"type": "namespace", "name": self.name, "description": self.description or "",
                    "tools": [_function_echo(t.name, t.description, t.parameters, t.strict)
                              for t in self.tools or ()]}
        return _function_echo(self.name or "", self.description, self.parameters, self.strict)


def _function_echo(name: str, description: str | None, parameters: dict[str, Any] | None,
                   strict: bool | None) -> dict[str, Any]:
    return {"type": "function", "name": name, "description": description, "parameters": parameters,
            "strict": strict}


class NamedToolChoiceIn(_Request):
    type: Literal["function"]
    name: str


def _tool_choice(value: Any) -> Any:
    if value is None or value in ("none", "auto", "required"):
        return value
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("name"), str):
        return value
    kind = value.get("type") if isinstance(value, dict) else None
    if isinstance(kind, str):
        raise ValueError(f"tool_choice of type '{kind}' is not supported; use 'none', 'auto', 'required' "
                         'or {"type": "function", "name": ...}')
    raise ValueError('must be \'none\', \'auto\', \'required\' or {"type": "function", "name": ...}')


class TextFormatIn(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfigIn(_Request):
    format: TextFormatIn | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class ReasoningIn(_Request):
    # Accepted and echoed; engine-neutral requests carry no effort setting (a
    # model either reasons or not), so it does not change the generation.
    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(_Request):
    model: str = Field(min_length=1)
    input: list[InputItem]
    instructions: str | None = None
    tools: list[ToolIn] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoiceIn | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: TextConfigIn | None = None
    reasoning: ReasoningIn | None = None
    stream: bool = False
    store: bool | None = None
    include: list[str] | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] | None = None
    client_metadata: dict[str, Any] | None = None
    user: str | None = None
    safety_identifier: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    service_tier: str | None = None
    # Refused in `_check`: each needs state or output this server does not have.
    previous_response_id: str | None = None
    conversation: Any = None
    background: bool | None = None
    prompt: Any = None
    top_logprobs: int | None = None

    _input = field_validator("input", mode="before")(_input_items)
    _choice = field_validator("tool_choice", mode="before")(_tool_choice)

    @field_validator("include")
    @classmethod
    def _no_logprobs(cls, value: list[str] | None) -> list[str] | None:
        # Other include values name outputs of tools that never run here, so there is nothing to include.
        if value and "message.output_text.logprobs" in value:
            raise ValueError("logprobs are not supported")
        return value

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        if value:
            raise ValueError("logprobs are not supported")
        return value

    @property
    def offered_tools(self) -> list[ToolIn]:
        return [t for t in self.tools or () if not t.dropped]


# ---------------------------------------------------------------- response


class InputTokensDetails(_Response):
    # Always present, 0 included: clients compute cache discounts from it.
    cached_tokens: int
    # packserve never charges for writing the prefix cache, so nothing is billed as a cache write.
    cache_write_tokens: int = 0


class OutputTokensDetails(_Response):
    reasoning_tokens: int


class ResponseUsageOut(_Response):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class OutputText(_Response):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


ItemStatus = Literal["in_progress", "completed", "incomplete"]


class MessageItem(_Response):
    type: Literal["message"] = "message"
    id: str
    status: ItemStatus
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class FunctionCallItem(_Response):
    type: Literal["function_call"] = "function_call"
    id: str
    call_id: str
    name: str
    namespace: str | None = None
    arguments: str
    status: ItemStatus


class SummaryText(_Response):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItem(_Response):
    keep_null: ClassVar[frozenset[str]] = frozenset({"encrypted_content"})
    type: Literal["reasoning"] = "reasoning"
    id: str
    summary: list[SummaryText]
    # Null: packserve has no encrypted reasoning to hand back (Codex asks for it with `include`).
    encrypted_content: str | None = None
    status: ItemStatus | None = None


OutputItem = MessageItem | FunctionCallItem | ReasoningItem


class IncompleteDetails(_Response):
    reason: Literal["max_output_tokens"]


class ResponseErrorOut(_Response):
    code: str
    message: str


ResponseStatus = Literal["in_progress", "completed", "incomplete", "failed"]


class ResponseObject(_Response):
    """The Response object. Fields OpenAI always sends, null or not, are kept as null."""

    keep_null: ClassVar[frozenset[str]] = frozenset({
        "completed_at", "error", "incomplete_details", "instructions", "max_output_tokens", "previous_response_id",
        "temperature", "top_p", "usage", "user"})
    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    completed_at: int | None = None
    error: ResponseErrorOut | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: None = None
    reasoning: dict[str, Any] | None = None
    # Always false, whatever the request said: packserve keeps no prompts or completions (SPEC §3).
    store: Literal[False] = False
    temperature: float | None = None
    text: dict[str, Any]
    tool_choice: str | dict[str, Any]
    tools: list[dict[str, Any]]
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsageOut | None = None
    user: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    prompt_cache_key: str | None = None
