"""Forced tool choice (`tool_choice` "required" or a named function) as constrained decoding.

A model left to itself may answer in prose although the client demanded a
call (and a model without a tool-call parser never produces one the engine
can recognise). As vLLM's own OpenAI server does, the output is constrained
to JSON: a named function's arguments object, or for "required" a non-empty
array of `{"name", "parameters"}` objects naming only the offered tools.
The JSON is then the tool calls, no parser involved. Pure: no I/O.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from serve_apps.engines.types import GenerationRequest, OutputFormat, ToolCall, ToolSpec

# JSON Schema of "any object": what a tool without a parameters schema takes.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def _parameters(tool: ToolSpec) -> dict[str, Any]:
    return tool.parameters or ANY_OBJECT


def _named(request: GenerationRequest) -> ToolSpec | None:
    choice = request.tool_choice
    if isinstance(choice, dict) and isinstance(choice.get("name"), str):
        return next((t for t in request.tools if t.name == choice["name"]), None)
    return None


def forced_tool_format(request: GenerationRequest) -> OutputFormat | None:
    """The output constraint that makes the answer the forced call(s); None when the choice is free."""
    if not request.tools:
        return None
    named = _named(request)
    if named is not None:
        return OutputFormat("json_schema", _parameters(named))
    if request.tool_choice != "required":
        return None
    calls = [{"type": "object",
              "properties": {"name": {"type": "string", "enum": [t.name]}, "parameters": _parameters(t)},
              "required": ["name", "parameters"]} for t in request.tools]
    return OutputFormat("json_schema", {"type": "array", "minItems": 1, "items": {"anyOf": calls}})


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_forced_calls(request: GenerationRequest, text: str) -> tuple[ToolCall, ...] | None:
    """The tool calls a constrained output spells; None if it is not complete JSON (cut by max_tokens)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    named = _named(request)
    if named is not None:
        return (ToolCall(new_call_id(), named.name, json.dumps(value)),) if isinstance(value, dict) else None
    offered = {t.name for t in request.tools}
    if not isinstance(value, list) or not value:
        return None
    calls: list[ToolCall] = []
    for item in value:
        if not isinstance(item, dict) or item.get("name") not in offered:
            return None
        calls.append(ToolCall(new_call_id(), str(item["name"]), json.dumps(item.get("parameters", {}))))
    return tuple(calls)
