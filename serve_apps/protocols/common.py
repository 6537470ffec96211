"""Pieces both protocol front-ends share: request errors, validation messages, SSE framing."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic

from serve_apps.engines.types import (
    STRUCTURED_OUTPUTS,
    FinishReason,
    GenerationChunk,
    ModelCard,
    OutputFormat,
    TokenUsage,
    ToolCall,
)


class InvalidRequest(ValueError):
    """A request that parsed but cannot be served as asked; the gateway answers 400.

    Raised by the converters (not by pydantic), e.g. a named tool that is not in
    `tools`. `param` names the offending field in the protocol's own notation.
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ResponseModel(pydantic.BaseModel):
    """Drops null fields on output except those the real API always sends as null."""

    model_config = pydantic.ConfigDict(extra="forbid")
    keep_null: ClassVar[frozenset[str]] = frozenset()

    @pydantic.model_serializer(mode="wrap")
    def _drop_nulls(self, handler: pydantic.SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        return {k: v for k, v in data.items() if v is not None or k in self.keep_null}


def strip_validator_prefix(msg: str) -> str:
    # pydantic prefixes errors raised in our validators; clients should not see that.
    for prefix in ("Value error, ", "Assertion failed, "):
        if msg.startswith(prefix):
            return msg[len(prefix) :]
    return msg


def format_loc(loc: tuple[int | str, ...], *, index_style: str) -> str:
    """`("messages", 0, "content")` → `messages[0].content` (openai) or `messages.0.content`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]" if index_style == "brackets" else f".{part}"
        else:
            out += f".{part}" if out else part
    return out


def describe_validation_error(exc: pydantic.ValidationError, *, index_style: str) -> tuple[str, str | None]:
    """First error of `exc` as (client-facing message, param path or None)."""
    errors = exc.errors(include_url=False)
    if not errors:
        return "Invalid request body.", None
    err = errors[0]
    loc = tuple(err.get("loc", ()))
    param = format_loc(loc, index_style=index_style) if loc else None
    msg = strip_validator_prefix(str(err.get("msg", "invalid value")))
    if not loc and err.get("type") == "model_type":
        # pydantic would name our class here; the client only needs to know the shape.
        return "The request body must be a JSON object.", None
    if err.get("type") == "missing" and param:
        return f"Missing required parameter: '{param}'.", param
    if err.get("type") == "extra_forbidden" and param:
        return f"Unrecognized request argument supplied: '{param}'.", param
    if param:
        return f"Invalid value for '{param}': {msg}", param
    return msg, None


def dumps(obj: Any) -> str:
    # Compact and ASCII-safe: SSE lines must not contain raw newlines, and
    # ensure_ascii keeps non-UTF-8-aware proxies from mangling text.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=True)


@dataclass
class GenerationResult:
    """A whole generation, folded from its chunks, for non-streaming responses."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    stop_sequence: str | None = None
    usage: TokenUsage = field(default_factory=TokenUsage)
    reasoning_tokens: int = 0

    def add(self, chunk: GenerationChunk) -> None:
        self.text += chunk.text
        self.reasoning += chunk.reasoning
        self.tool_calls.extend(chunk.tool_calls)
        if chunk.usage is not None:
            self.reasoning_tokens += reasoning_tokens_of(chunk, self.usage)
            self.usage = chunk.usage
        if chunk.finish_reason is not None:
            self.finish_reason = chunk.finish_reason
            self.stop_sequence = chunk.stop_sequence


def reasoning_tokens_of(chunk: GenerationChunk, before: TokenUsage) -> int:
    """Output tokens `chunk` spent reasoning, given the running usage before it.

    Engines report running usage, not a reasoning count: a chunk that carries
    only reasoning spent all its new tokens on it. A chunk that mixes reasoning
    with text (the step where the model stops thinking) counts as output.
    """
    if chunk.usage is None or not chunk.reasoning or chunk.text or chunk.tool_calls:
        return 0
    return max(chunk.usage.completion_tokens - before.completion_tokens, 0)


def supported_output_format(fmt: OutputFormat, card: ModelCard, param: str, name: str) -> OutputFormat:
    """`fmt` if the model can constrain its output; refused otherwise, never ignored (the client parses it)."""
    if STRUCTURED_OUTPUTS not in card.features:
        raise InvalidRequest(f"The model '{card.id}' does not support {name}; models listing the "
                             f"'{STRUCTURED_OUTPUTS}' feature in GET /v1/models do.", param)
    return fmt


def clamp_max_tokens(requested: int | None, card: ModelCard, default: int | None = None) -> int:
    """The output budget to give the engine: the request's, capped at the model's limit.

    Clamped instead of rejected: coding agents routinely ask for more output than
    a self-hosted model allows (32k from Claude-Code-style clients), and a 400
    there would break them for no benefit to anyone.
    """
    limit = card.max_output_tokens
    if requested is None:
        return min(default, limit) if default is not None else limit
    return min(requested, limit)
