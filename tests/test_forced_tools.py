"""Forced tool choice as constrained JSON (serve_apps/engines/forced_tools.py): pure, no engine."""

from __future__ import annotations

import json

import jsonschema
import pytest

from serve_apps.engines.forced_tools import forced_tool_format, parse_forced_calls
from serve_apps.engines.types import ChatMessage, GenerationRequest, SamplingParams, ToolSpec

WEATHER = ToolSpec("get_weather", "weather", {"type": "object", "properties": {"city": {"type": "string"}},
                                              "required": ["city"]})
TIME = ToolSpec("get_time", "time", {})


def request(choice: object, tools: tuple[ToolSpec, ...] = (WEATHER, TIME)) -> GenerationRequest:
    return GenerationRequest(request_id="r", model="m", sampling=SamplingParams(max_tokens=8),
                             messages=(ChatMessage("user", "hi"),), tools=tools,
                             tool_choice=choice)  # type: ignore[arg-type]


@pytest.mark.parametrize("choice", [None, "auto", "none", {"name": "not_offered"}])
def test_a_free_choice_is_not_constrained(choice: object) -> None:
    assert forced_tool_format(request(choice)) is None
    assert forced_tool_format(request("required", tools=())) is None


def test_a_named_function_constrains_to_its_arguments() -> None:
    fmt = forced_tool_format(request({"name": "get_weather"}))
    assert fmt is not None and fmt.kind == "json_schema" and fmt.schema == WEATHER.parameters
    untyped = forced_tool_format(request({"name": "get_time"}))
    assert untyped is not None and untyped.schema == {"type": "object"}
    [call] = parse_forced_calls(request({"name": "get_weather"}), '{"city": "Paris"}') or ()
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.id.startswith("call_")


def test_required_constrains_to_calls_of_offered_tools_only() -> None:
    fmt = forced_tool_format(request("required"))
    assert fmt is not None and fmt.schema is not None
    good = [{"name": "get_weather", "parameters": {"city": "Oslo"}}, {"name": "get_time", "parameters": {}}]
    jsonschema.validate(good, fmt.schema)
    bads: list[object] = [[], [{"name": "rm_rf", "parameters": {}}], [{"name": "get_weather", "parameters": {}}], {}]
    for bad in bads:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, fmt.schema)
    calls = parse_forced_calls(request("required"), json.dumps(good)) or ()
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}),
                                                                  ("get_time", {})]
    assert len({c.id for c in calls}) == 2


@pytest.mark.parametrize(("choice", "text"), [
    ({"name": "get_weather"}, '{"city": "Par'),  # cut by max_tokens
    ({"name": "get_weather"}, "[1]"),
    ("required", "[]"),
    ("required", '[{"name": "rm_rf", "parameters": {}}]'),
    ("required", '{"name": "get_time"}'),
])
def test_output_that_is_not_the_calls_is_not_parsed_as_calls(choice: object, text: str) -> None:
    assert parse_forced_calls(request(choice), text) is None
