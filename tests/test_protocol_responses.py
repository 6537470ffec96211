"""Responses API wire models, converters and stream encoder, checked against the official SDK's types.

Everything packserve emits is validated with the `openai` SDK's own pydantic
models (`Response`, the `ResponseStreamEvent` union), and the stream is fed to
the SDK's stream-helper state machine, which refuses out-of-order events,
unfinished items and changing ids.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pydantic
import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent

from serve_apps.engines.sim import SIM_LARGE, SIM_SMALL, SimulatedEngine
from serve_apps.engines.types import ChatMessage, GenerationChunk, ModelCard, TokenUsage, ToolCall
from serve_apps.protocols.common import GenerationResult, InvalidRequest
from serve_apps.protocols.responses_convert import (
    response_echo,
    responses_response,
    responses_to_generation,
)
from serve_apps.protocols.responses_models import ResponsesRequest, validation_message
from serve_apps.protocols.responses_stream import ResponsesStreamEncoder

CARDS = {c.id: c for c in SimulatedEngine().cards()}
LARGE: ModelCard = CARDS[SIM_LARGE]
RID = "resp_0123456789abcdef01234567"
EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                          "additionalProperties": False}}
AGENTS = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
          "tools": [{"type": "function", "name": "spawn_agent", "description": "Start one.", "strict": False,
                     "parameters": {"type": "object", "properties": {"task": {"type": "string"}}}}]}


def request(**overrides: Any) -> ResponsesRequest:
    body: dict[str, Any] = {"model": SIM_LARGE, "input": "hello"}
    body.update(overrides)
    return ResponsesRequest.model_validate(body)


def refused(body: dict[str, Any]) -> tuple[str, str | None]:
    """The 400 (message, param) a body gets, from validation or from the converter."""
    try:
        req = ResponsesRequest.model_validate({"model": SIM_LARGE, **body})
    except pydantic.ValidationError as exc:
        return validation_message(exc)
    with pytest.raises(InvalidRequest) as err:
        responses_to_generation(req, RID, LARGE)
    return err.value.message, err.value.param


def result_of(chunks: Sequence[GenerationChunk]) -> GenerationResult:
    result = GenerationResult()
    for c in chunks:
        result.add(c)
    return result


def sse_events(lines: Sequence[str]) -> list[dict[str, Any]]:
    events = []
    for frame in "".join(lines).split("\n\n"):
        if not frame:
            continue
        head, data = frame.split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        events.append(payload)
    return events


# -- requests ---------------------------------------------------------------------------------

def test_string_input_and_instructions_become_system_then_user() -> None:
    gen = responses_to_generation(request(instructions="be brief", max_output_tokens=50, temperature=0.2,
                                          top_p=0.9), RID, LARGE)
    assert gen.messages == (ChatMessage("system", "be brief"), ChatMessage("user", "hello"))
    assert (gen.sampling.max_tokens, gen.sampling.temperature, gen.sampling.top_p) == (50, 0.2, 0.9)
    assert gen.request_id == RID and gen.tools == () and gen.output_format is None
    # An output budget beyond the model's is clamped, as chat does, not refused.
    assert responses_to_generation(request(max_output_tokens=10**6), RID, LARGE).sampling.max_tokens == 4096


def test_items_become_chat_turns() -> None:
    req = request(input=[
        {"type": "message", "id": "msg_a", "role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {"role": "user", "content": "weather?"},
        {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "hm"}],
         "encrypted_content": None},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Let me look.",
                                                               "annotations": []}]},
        {"type": "reasoning", "id": "rs_2", "summary": []},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": '{"city":"Paris"}', "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "spawn_agent", "namespace": "multi_agent_v1",
         "arguments": {"task": "x"}},
        {"type": "function_call_output", "id": "fco_1", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "ok"}]},
    ], tools=[WEATHER, AGENTS])
    gen = responses_to_generation(req, RID, LARGE)
    assert gen.messages == (
        ChatMessage("system", "rules"),
        ChatMessage("user", "weather?"),
        ChatMessage("assistant", "Let me look.", tool_calls=(
            ToolCall("call_1", "get_weather", '{"city":"Paris"}'),
            ToolCall("call_2", "multi_agent_v1.spawn_agent", '{"task": "x"}'))),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
        ChatMessage("tool", "ok", tool_call_id="call_2"),
    )
    assert [t.name for t in gen.tools] == ["get_weather", "multi_agent_v1.spawn_agent"]
    assert gen.tools[0].parameters == WEATHER["parameters"]


def test_tool_choice_and_dropped_web_search() -> None:
    tools = [WEATHER, AGENTS, {"type": "web_search", "external_web_access": False}]
    gen = responses_to_generation(request(tools=tools, tool_choice="required"), RID, LARGE)
    assert [t.name for t in gen.tools] == ["get_weather", "multi_agent_v1.spawn_agent"]
    assert gen.tool_choice == "required"
    named = responses_to_generation(request(tools=tools, tool_choice={"type": "function", "name": "spawn_agent"}),
                                    RID, LARGE)
    assert named.tool_choice == {"name": "multi_agent_v1.spawn_agent"}
    # The Response lists what the model was offered: web_search is not among it.
    echo = response_echo(request(tools=tools))
    assert [t["type"] for t in echo.fields["tools"]] == ["function", "namespace"]


@pytest.mark.parametrize(("body", "param", "words"), [
    ({"input": "hi", "previous_response_id": "resp_x"}, "previous_response_id", "stores no prompts"),
    ({"input": "hi", "conversation": "conv_1"}, "conversation", "stores no prompts"),
    ({"input": "hi", "background": True}, "background", "Background responses"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]", "item_reference"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,"}]}]},
     "input[0].content[0]", "text only"),
    ({"input": []}, "input", "non-empty"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input", "no message"),
    ({"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": ["vs_1"]}]}, "tools[0]",
     "OpenAI's servers"),
    ({"input": "hi", "tools": [{"type": "custom", "name": "apply_patch"}]}, "tools[0]", "OpenAI's servers"),
    ({"input": "hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice",
     "'nope'"),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice", "at least one function"),
    ({"input": "hi", "tool_choice": {"type": "file_search"}}, "tool_choice", "'file_search'"),
    ({"input": "hi", "text": {"format": {"type": "json_object"}}}, "text.format", "structured_outputs"),
    ({"input": "hi", "include": ["message.output_text.logprobs"]}, "include", "logprobs"),
    ({"input": "hi", "temperature": 3}, "temperature", "less than or equal to 2"),
    ({"input": [{"type": "message", "content": "no role"}]}, "input[0]", "'role'"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]", "'call_id'"),
])
def test_what_cannot_be_served_is_a_clear_400(body: dict[str, Any], param: str, words: str) -> None:
    message, got_param = refused(body)
    assert got_param == param, message
    assert words in message


def test_structured_output_where_the_model_supports_it() -> None:
    card = ModelCard(**{**LARGE.__dict__, "features": (*LARGE.features, "structured_outputs")})
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    gen = responses_to_generation(request(text={"format": {"type": "json_schema", "name": "s", "schema": schema,
                                                           "strict": True}}), RID, card)
    assert gen.output_format is not None and (gen.output_format.kind, gen.output_format.schema) == ("json_schema",
                                                                                                   schema)
    gen = responses_to_generation(request(text={"format": {"type": "json_object"}}), RID, card)
    assert gen.output_format is not None and gen.output_format.kind == "json_object"


def test_unknown_fields_and_codex_settings_are_accepted() -> None:
    req = request(store=True, include=["reasoning.encrypted_content"], reasoning={"effort": "high", "summary": "auto"},
                  parallel_tool_calls=True, prompt_cache_key="k", client_metadata={"x": "y"},
                  metadata={"a": "b"}, text={"verbosity": "low"}, some_future_field=1)
    assert responses_to_generation(req, RID, LARGE).messages == (ChatMessage("user", "hello"),)


# -- responses --------------------------------------------------------------------------------

def chunks_with_everything() -> list[GenerationChunk]:
    return [
        GenerationChunk(reasoning="first", usage=TokenUsage(30, 16, 1)),
        GenerationChunk(reasoning=" check", usage=TokenUsage(30, 16, 2)),
        GenerationChunk(text="Hello", usage=TokenUsage(30, 16, 3)),
        GenerationChunk(text=" there", usage=TokenUsage(30, 16, 4)),
        GenerationChunk(tool_calls=(ToolCall("call_9", "multi_agent_v1.spawn_agent", '{"task":"t"}'),),
                        usage=TokenUsage(30, 16, 9)),
        GenerationChunk(finish_reason="tool_calls", usage=TokenUsage(30, 16, 9)),
    ]


def test_response_body_parses_with_the_sdk() -> None:
    req = request(tools=[AGENTS], instructions="sys", metadata={"k": "v"})
    body = responses_response(result_of(chunks_with_everything()), response_echo(req), response_id=RID,
                              created_at=100, completed_at=101)
    resp = Response.model_validate(body)
    assert (resp.id, resp.object, resp.status, resp.created_at, resp.completed_at) == (RID, "response", "completed",
                                                                                       100, 101)
    assert [o.type for o in resp.output] == ["reasoning", "message", "function_call"]
    reasoning, _, call = body["output"]
    assert reasoning["summary"] == [{"type": "summary_text", "text": "first check"}]
    assert resp.output_text == "Hello there"
    assert (call["name"], call["namespace"], call["call_id"], call["arguments"]) == (
        "spawn_agent", "multi_agent_v1", "call_9", '{"task":"t"}')
    assert len({o["id"] for o in body["output"]}) == 3
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.input_tokens_details.cached_tokens, resp.usage.output_tokens,
            resp.usage.output_tokens_details.reasoning_tokens, resp.usage.total_tokens) == (30, 16, 9, 2, 39)
    assert (resp.instructions, resp.metadata, body["store"]) == ("sys", {"k": "v"}, False)
    assert body["error"] is None and body["incomplete_details"] is None and body["previous_response_id"] is None


def test_cached_tokens_are_present_when_zero_and_truncation_is_incomplete() -> None:
    chunks = [GenerationChunk(text="a b", usage=TokenUsage(5, 0, 2)),
              GenerationChunk(finish_reason="length", usage=TokenUsage(5, 0, 2))]
    body = responses_response(result_of(chunks), response_echo(request(max_output_tokens=2)), response_id=RID,
                              created_at=1, completed_at=2)
    assert body["usage"]["input_tokens_details"]["cached_tokens"] == 0
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["completed_at"] is None and body["output"][0]["status"] == "incomplete"
    assert Response.model_validate(body).output_text == "a b"


# -- the stream -------------------------------------------------------------------------------

def stream_of(chunks: Sequence[GenerationChunk], req: ResponsesRequest) -> list[str]:
    enc = ResponsesStreamEncoder(response_echo(req), RID, 100)
    lines = enc.start()
    for c in chunks:
        lines += enc.chunk(c)
    return lines + enc.finish(completed_at=101)


def test_stream_events_parse_in_order_and_end_with_the_non_streamed_body() -> None:
    req = request(tools=[AGENTS])
    chunks = chunks_with_everything()
    events = sse_events(stream_of(chunks, req))
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.reasoning_summary_part.added",
        "response.reasoning_summary_text.delta", "response.reasoning_summary_text.delta",
        "response.reasoning_summary_text.done", "response.reasoning_summary_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed",
    ]
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=[], text_format=omit)
    for e in events:
        state.handle_event(EVENT.validate_python(e))
    final = state._completed_response
    assert final is not None and final.output_text == "Hello there"
    # The terminal event carries exactly what the non-streamed request would have returned.
    body = responses_response(result_of(chunks), response_echo(req), response_id=RID, created_at=100,
                              completed_at=101)
    assert events[-1]["response"] == body
    assert events[0]["response"]["status"] == "in_progress" and events[0]["response"]["output"] == []


def test_stream_of_a_truncated_answer_ends_incomplete() -> None:
    chunks = [GenerationChunk(text="a", usage=TokenUsage(5, 0, 1)),
              GenerationChunk(finish_reason="length", usage=TokenUsage(5, 0, 1))]
    events = sse_events(stream_of(chunks, request(max_output_tokens=1)))
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    for e in events:
        EVENT.validate_python(e)


def test_stream_with_no_output_still_has_one_message() -> None:
    events = sse_events(stream_of([GenerationChunk(finish_reason="stop", usage=TokenUsage(5, 0, 0))], request()))
    final = Response.model_validate(events[-1]["response"])
    assert [o.type for o in final.output] == ["message"] and final.output_text == ""
    body = responses_response(result_of([GenerationChunk(finish_reason="stop", usage=TokenUsage(5, 0, 0))]),
                              response_echo(request()), response_id=RID, created_at=100, completed_at=101)
    assert body == events[-1]["response"]


def test_a_failure_mid_stream_is_response_failed_with_the_usage_so_far() -> None:
    enc = ResponsesStreamEncoder(response_echo(request()), RID, 100)
    lines = enc.start() + enc.chunk(GenerationChunk(text="partial", usage=TokenUsage(5, 0, 1)))
    events = sse_events([*lines, enc.fail("boom")])
    failed = events[-1]
    assert failed["type"] == "response.failed" and failed["sequence_number"] == len(events) - 1
    resp = Response.model_validate(failed["response"])
    assert resp.status == "failed" and resp.error is not None and resp.error.message == "boom"
    assert resp.usage is not None and resp.usage.output_tokens == 1
    assert enc.finish() == []


def test_sim_output_streams_and_collects_the_same(tmp_path: Any) -> None:
    """A real engine's chunks (the simulated one, a `think` prompt with a tool) through both paths."""
    import asyncio

    req = request(model=SIM_SMALL, input="think about the weather please", tools=[WEATHER])
    gen = responses_to_generation(req, RID, CARDS[SIM_SMALL])

    async def run() -> list[GenerationChunk]:
        return [c async for c in SimulatedEngine().generate(gen)]

    chunks = asyncio.run(run())
    events = sse_events(stream_of(chunks, req))
    body = responses_response(result_of(chunks), response_echo(req), response_id=RID, created_at=100,
                              completed_at=101)
    assert events[-1]["response"] == body
    assert [o["type"] for o in body["output"]] == ["function_call"]
