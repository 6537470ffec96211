"""Anthropic Messages wire models: requests, responses, stream events, errors.

Unknown fields are ignored (the SDK and Claude-Code-style agents send beta
fields like `cache_control`, `metadata`, `thinking`, `context_management`;
docs/agents.md says why each is ignored or honoured). Messages may have role
`system` (Anthropic's mid-conversation system messages), text only.
Content blocks are one permissive model checked per `type`, so an
unsupported block (an image) yields one clear message naming its position
instead of a discriminated-union error listing every block kind.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serve_apps.protocols.common import (
    ResponseModel,
    describe_validation_error,
    format_loc,
    strip_validator_prefix,
)

_UNSUPPORTED_BLOCKS = {"image", "document", "search_result", "container_upload"}
# Accepted and dropped: the model cannot use earlier turns' hidden reasoning.
_IGNORED_BLOCKS = {"thinking", "redacted_thinking"}


def validation_message(exc: pydantic.ValidationError) -> tuple[str, str | None]:
    """(message, param) for an Anthropic 400, worded as Anthropic words it:
    `messages.1.role: Input should be 'user' or 'assistant'`, `max_tokens: Field
    required`. Anthropic bodies have no `param`, so the message names the field
    first; clients that fall back on a refusal (Claude Code) match that form."""
    errors = exc.errors(include_url=False)
    if not errors:
        return "Invalid request body.", None
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    if not loc:
        return describe_validation_error(exc, index_style="dots")
    param = format_loc(loc, index_style="dots")
    return f"{param}: {strip_validator_prefix(str(err.get('msg', 'invalid value')))}", param


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


def _text_blocks(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValueError("must be a string or an array of text blocks")
    for i, block in enumerate(value):
        kind = block.get("type") if isinstance(block, dict) else None
        kind = kind if isinstance(kind, str) else None  # a list or object here must not reach a set lookup
        if kind in _UNSUPPORTED_BLOCKS:
            raise ValueError(f"block {i} has type '{kind}', but this server accepts text only")
        if kind != "text" or not isinstance(block.get("text"), str):
            raise ValueError(f"block {i} must be {{'type': 'text', 'text': string}}")
    return value


class TextBlockIn(_Request):
    type: Literal["text"] = "text"
    text: str


class ContentBlockIn(_Request):
    """Any input block; `_check` enforces the fields its `type` requires."""

    type: str
    text: str | None = None
    id: str | None = None
    name: str | None = None
    input: dict[str, Any] | None = None
    tool_use_id: str | None = None
    content: list[TextBlockIn] | None = None
    is_error: bool | None = None

    _content = field_validator("content", mode="before")(_text_blocks)

    @model_validator(mode="after")
    def _check(self) -> ContentBlockIn:
        if self.type in _UNSUPPORTED_BLOCKS:
            raise ValueError(f"'{self.type}' blocks are not supported by this server; send text only")
        if self.type == "text":
            if self.text is None:
                raise ValueError("a text block needs 'text'")
        elif self.type == "tool_use":
            if not self.id or not self.name or self.input is None:
                raise ValueError("a tool_use block needs 'id', 'name' and 'input'")
        elif self.type == "tool_result":
            if not self.tool_use_id:
                raise ValueError("a tool_result block needs 'tool_use_id'")
        elif self.type not in _IGNORED_BLOCKS:
            raise ValueError(f"unsupported content block type '{self.type}'")
        return self

    @property
    def result_text(self) -> str:
        return "\n".join(b.text for b in self.content or ())


def _message_content(value: Any) -> Any:
    if isinstance(value, str):
        return [{"type": "text", "text": value}]
    if not isinstance(value, list):
        raise ValueError("must be a string or an array of content blocks")
    return value


class MessageIn(_Request):
    """A turn. `system` is Anthropic's mid-conversation system message (text only);
    the converter folds it into the neighbouring user turn."""

    role: Literal["user", "assistant", "system"]
    content: list[ContentBlockIn]

    _content = field_validator("content", mode="before")(_message_content)

    @model_validator(mode="after")
    def _system_is_text(self) -> MessageIn:
        if self.role == "system":
            for i, block in enumerate(self.content):
                if block.type != "text":
                    # Worded so Claude Code's fallback (a 400 saying "not supported" about "role 'system'")
                    # resends the message as user text instead of failing the session.
                    raise ValueError(f"role 'system' with non-text content is not supported: content.{i} has "
                                     f"type '{block.type}'")
        return self


class ToolIn(_Request):
    type: str | None = None
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any]

    @field_validator("type")
    @classmethod
    def _custom_only(cls, value: str | None) -> str | None:
        if value not in (None, "custom"):
            raise ValueError(f"server tool '{value}' is not supported; define it as a custom tool")
        return value


class ToolChoiceIn(_Request):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoiceIn:
        if self.type == "tool" and not self.name:
            raise ValueError("tool_choice of type 'tool' needs 'name'")
        return self


class _PromptFields(_Request):
    model: str = Field(min_length=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: list[TextBlockIn] | None = None
    tools: list[ToolIn] | None = None
    tool_choice: ToolChoiceIn | None = None
    thinking: dict[str, Any] | None = None

    _system = field_validator("system", mode="before")(_text_blocks)


class JsonOutputFormatIn(_Request):
    type: Literal["json_schema"]
    # `schema` shadows a BaseModel attribute, hence the alias.
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigIn(_Request):
    format: JsonOutputFormatIn | None = None
    effort: str | None = None  # a reasoning hint; open models have no such knob


class MessagesRequest(_PromptFields):
    max_tokens: int = Field(ge=1)
    output_config: OutputConfigIn | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=16)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    metadata: dict[str, Any] | None = None


class CountTokensRequest(_PromptFields):
    pass


# ---------------------------------------------------------------- responses

StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class UsageOut(ResponseModel):
    """All four counts always present, 0 included; `input_tokens` excludes cache reads."""

    input_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int
    output_tokens: int


class TextBlockOut(ResponseModel):
    type: Literal["text"] = "text"
    text: str


class ThinkingBlockOut(ResponseModel):
    type: Literal["thinking"] = "thinking"
    thinking: str
    signature: str = ""


class ToolUseBlockOut(ResponseModel):
    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlockOut = TextBlockOut | ThinkingBlockOut | ToolUseBlockOut


class MessageOut(ResponseModel):
    keep_null: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})
    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlockOut]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: UsageOut


class MessageTokensCount(ResponseModel):
    input_tokens: int


class ErrorDetail(ResponseModel):
    type: str
    message: str


class ErrorResponse(ResponseModel):
    type: Literal["error"] = "error"
    error: ErrorDetail


# ---------------------------------------------------------------- stream events


class MessageStartEvent(ResponseModel):
    type: Literal["message_start"] = "message_start"
    message: MessageOut


class ContentBlockStartEvent(ResponseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlockOut


class TextDelta(ResponseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class ThinkingDelta(ResponseModel):
    type: Literal["thinking_delta"] = "thinking_delta"
    thinking: str


class InputJsonDelta(ResponseModel):
    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class ContentBlockDeltaEvent(ResponseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | ThinkingDelta | InputJsonDelta


class ContentBlockStopEvent(ResponseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(ResponseModel):
    keep_null: ClassVar[frozenset[str]] = frozenset({"stop_reason", "stop_sequence"})
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDeltaEvent(ResponseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: UsageOut


class MessageStopEvent(ResponseModel):
    type: Literal["message_stop"] = "message_stop"


class PingEvent(ResponseModel):
    type: Literal["ping"] = "ping"
