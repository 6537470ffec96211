"""Anthropic Messages wire models, converters and stream encoder, checked against the official SDK."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import anthropic.types as at
import pydantic
import pytest
from anthropic.lib.streaming._messages import accumulate_event

from serve_apps.engines.sim import SIM_LARGE, SIM_SMALL, SimulatedEngine
from serve_apps.engines.types import (
    STRUCTURED_OUTPUTS,
    GenerationChunk,
    ModelCard,
    OutputFormat,
    TokenUsage,
    ToolCall,
)
from serve_apps.protocols.anthropic_convert import (
    count_tokens_body,
    error_body,
    message_response,
    messages_to_generation,
    model_not_found_body,
    prompt_parts,
    stop_reason,
    tool_input,
)
from serve_apps.protocols.anthropic_models import CountTokensRequest, MessagesRequest, validation_message
from serve_apps.protocols.anthropic_stream import AnthropicStreamEncoder, error_event
from serve_apps.protocols.common import GenerationResult, InvalidRequest

CARDS = {c.id: c for c in SimulatedEngine().cards()}
LARGE: ModelCard = CARDS[SIM_LARGE]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
EVENT = pydantic.TypeAdapter(at.RawMessageStreamEvent)


def body(**overrides: Any) -> dict[str, Any]:
    b: dict[str, Any] = {"model": SIM_LARGE, "max_tokens": 256, "messages": [{"role": "user", "content": "hello"}]}
    b.update(overrides)
    return b


def error_of(model: type[pydantic.BaseModel], data: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(data)
    return validation_message(info.value)


def parse_sse(frames: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Each frame is exactly `event: <type>\\ndata: <json>\\n\\n` with the event name equal to data.type."""
    out = []
    for frame in frames:
        assert frame.endswith("\n\n")
        event_line, data_line = frame[:-2].split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        name, data = event_line[len("event: ") :], json.loads(data_line[len("data: ") :])
        assert data["type"] == name
        out.append((name, data))
    return out


async def generate(data: dict[str, Any], engine: SimulatedEngine | None = None) -> list[GenerationChunk]:
    req = MessagesRequest.model_validate(data)
    engine = engine or SimulatedEngine()
    return [c async for c in engine.generate(messages_to_generation(req, "msg-req", CARDS[req.model]))]


def fold(chunks: list[GenerationChunk]) -> GenerationResult:
    result = GenerationResult()
    for c in chunks:
        result.add(c)
    return result


def encode(chunks: list[GenerationChunk], model: str = SIM_LARGE) -> list[str]:
    enc = AnthropicStreamEncoder("msg_1", model)
    frames = [f for c in chunks for f in enc.chunk(c)]
    frames += enc.finish()
    assert enc.finish() == []
    return frames


# ---------------------------------------------------------------- requests


def test_request_conversion_with_tools_and_results() -> None:
    req = MessagesRequest.model_validate(
        body(
            system=[{"type": "text", "text": "be terse", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "weather in Paris?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
                        {"type": "text", "text": "Checking."},
                        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "boom"}],
                            "is_error": True,
                        },
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "tool", "name": "get_weather"},
            stop_sequences=["END", ""],
            temperature=0.2,
            top_k=5,
            metadata={"user_id": "u"},
            thinking={"type": "enabled", "budget_tokens": 1024},
            max_tokens=64000,
        )
    )
    gen = messages_to_generation(req, "r", LARGE)
    assert [m.role for m in gen.messages] == ["system", "user", "assistant", "tool", "tool", "user"]
    assert gen.messages[0].content == "be terse"
    assert gen.messages[2].content == "Checking."
    assert gen.messages[2].tool_calls == (ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),)
    assert gen.messages[3].tool_call_id == "toolu_1" and gen.messages[3].content == "sunny"
    assert gen.messages[4].content == "Error: boom"
    assert gen.messages[5].content == "thanks"
    assert gen.tool_choice == {"name": "get_weather"}
    assert gen.sampling.stop == ("END",) and gen.sampling.temperature == 0.2 and gen.sampling.top_k == 5
    assert gen.sampling.max_tokens == LARGE.max_output_tokens  # clamped, not rejected


def test_output_config_format_is_a_json_schema_for_models_that_can_honour_it() -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}}}
    req = MessagesRequest.model_validate(body(output_config={"format": {"type": "json_schema", "schema": schema},
                                                             "effort": "low"}))
    structured = dataclasses.replace(LARGE, features=(*LARGE.features, STRUCTURED_OUTPUTS))
    assert messages_to_generation(req, "r", structured).output_format == OutputFormat("json_schema", schema)
    with pytest.raises(InvalidRequest) as refused:
        messages_to_generation(req, "r", LARGE)  # the simulated model cannot constrain its output
    assert refused.value.param == "output_config.format" and STRUCTURED_OUTPUTS in refused.value.message
    plain = MessagesRequest.model_validate(body(output_config={"effort": "high"}))
    assert messages_to_generation(plain, "r", LARGE).output_format is None
    with pytest.raises(pydantic.ValidationError):
        MessagesRequest.model_validate(body(output_config={"format": {"type": "json_schema"}}))


def test_tool_choice_mapping_and_errors() -> None:
    def choice(tc: dict[str, Any], tools: list[dict[str, Any]] | None = None) -> object:
        req = MessagesRequest.model_validate(body(tools=[WEATHER_TOOL] if tools is None else tools, tool_choice=tc))
        return messages_to_generation(req, "r", LARGE).tool_choice

    assert choice({"type": "auto"}) == "auto"
    assert choice({"type": "any"}) == "required"
    assert choice({"type": "none"}) == "none"
    with pytest.raises(InvalidRequest):
        choice({"type": "tool", "name": "nope"})
    with pytest.raises(InvalidRequest):
        choice({"type": "any"}, tools=[])


@pytest.mark.parametrize(
    ("data", "param", "needle"),
    [
        ({"model": SIM_LARGE, "messages": [{"role": "user", "content": "x"}]}, "max_tokens",
         "max_tokens: Field required"),
        (body(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (body(messages=[{"role": "user", "content": [{"type": "image", "source": {}}]}]),
         "messages.0.content.0", "not supported"),
        (body(messages=[{"role": "user", "content": [{"type": "tool_use", "id": "x"}]}]),
         "messages.0.content.0", "needs 'id', 'name' and 'input'"),
        (body(messages=[{"role": "developer", "content": "x"}]), "messages.0.role",
         "messages.0.role: Input should be 'user', 'assistant' or 'system'"),
        (body(messages=[{"role": "user", "content": "x"},
                        {"role": "system", "content": [{"type": "tool_result", "tool_use_id": "t"}]}]),
         "messages.1", "may contain only text blocks"),
        (body(messages=[]), "messages", "at least 1"),
        (body(temperature=1.5), "temperature", "less than or equal to 1"),
        (body(tool_choice={"type": "tool"}), "tool_choice", "needs 'name'"),
        (body(tools=[{"type": "web_search_20250305", "name": "web_search"}]), "tools.0.type", "not supported"),
        (body(system=[{"type": "image"}]), "system", "text only"),
    ],
)  # fmt: skip
def test_validation_messages_name_the_field(data: dict[str, Any], param: str, needle: str) -> None:
    message, got = error_of(MessagesRequest, data)
    assert got == param
    # Anthropic's own form, which clients match: the field path, a colon, then the reason.
    assert message.startswith(f"{param}: ") and needle in message and "Value error" not in message


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def system(text: str) -> dict[str, Any]:
    return {"role": "system", "content": [{"type": "text", "text": text, "cache_control": {"type": "ephemeral"}}]}


def reminder(text: str) -> str:
    return f"<system-reminder>\n{text}\n</system-reminder>"


def test_mid_conversation_system_messages_fold_into_the_neighbouring_user_turn() -> None:
    assistant = {"role": "assistant", "content": "ok"}
    tool_use = {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "Read", "input": {}}]}
    tool_result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "data"}]}

    def turns(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
        got, _ = prompt_parts(MessagesRequest.model_validate(body(system="top", messages=messages)))
        return [(m.role, m.content) for m in got]

    # Claude Code's first request: the user's prompt, then the system message after it.
    assert turns([user("Say hello"), system("Available agent types: ...")]) == [
        ("system", "top"), ("user", "Say hello\n" + reminder("Available agent types: ..."))]
    # Before a user turn (nothing before it, or an assistant turn): prepended to the next user turn.
    assert turns([system("s1"), system("s2"), user("u")]) == [
        ("system", "top"), ("user", reminder("s1") + "\n" + reminder("s2") + "\nu")]
    assert turns([user("u"), assistant, system("s"), user("v")]) == [
        ("system", "top"), ("user", "u"), ("assistant", "ok"), ("user", reminder("s") + "\nv")]
    # Between assistant turns or last after one: a user turn of its own.
    assert turns([user("u"), assistant, system("s")]) == [
        ("system", "top"), ("user", "u"), ("assistant", "ok"), ("user", reminder("s"))]
    # After a tool result: the result stays a tool message and the reminder follows it as user text.
    got = turns([user("u"), tool_use, tool_result, system("s")])
    assert got[-2:] == [("tool", "data"), ("user", reminder("s"))]


async def test_count_tokens_counts_folded_system_messages() -> None:
    engine = SimulatedEngine()
    messages = [user("Say hello"), system("Available agent types for the Agent tool: general-purpose")]
    counted = CountTokensRequest.model_validate({"model": SIM_LARGE, "messages": messages})
    count = await engine.count_tokens(SIM_LARGE, *prompt_parts(counted)[:1], None, prompt_parts(counted)[1])
    gen = messages_to_generation(MessagesRequest.model_validate(body(messages=messages)), "r", LARGE)
    chunks = [c async for c in engine.generate(gen)]
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == count
    folded = [(m.role, m.content) for m in gen.messages]
    assert folded == [("user", "Say hello\n" + reminder("Available agent types for the Agent tool: general-purpose"))]


async def test_count_tokens_matches_generation_prompt_tokens() -> None:
    engine = SimulatedEngine()
    data = body(system="sys", tools=[WEATHER_TOOL])
    count_req = CountTokensRequest.model_validate({k: v for k, v in data.items() if k != "max_tokens"})
    messages, tools = prompt_parts(count_req)
    n = await engine.count_tokens(count_req.model, messages, None, tools)
    out = count_tokens_body(n)
    assert at.MessageTokensCount.model_validate(out).input_tokens == n > 0
    chunks = await generate(data, SimulatedEngine())
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == n


# ---------------------------------------------------------------- responses


async def test_message_response_parses_with_sdk_usage_always_present() -> None:
    chunks = await generate(body())
    out = message_response(fold(chunks), message_id="msg_1", model=SIM_LARGE)
    msg = at.Message.model_validate(out)
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None and "stop_sequence" in out
    assert [b.type for b in msg.content] == ["text"]
    assert out["usage"] == {
        "input_tokens": chunks[-1].usage.prompt_tokens,  # type: ignore[union-attr]
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": chunks[-1].usage.completion_tokens,  # type: ignore[union-attr]
    }


async def test_cached_tokens_reported_uncached_input() -> None:
    engine = SimulatedEngine()
    system = "You are a coding agent. " * 20
    await generate(body(system=system), engine)
    chunks = await generate(body(system=system), engine)
    usage = chunks[-1].usage
    assert usage is not None and usage.cached_tokens > 0
    out = message_response(fold(chunks), message_id="msg_2", model=SIM_LARGE)
    assert out["usage"]["cache_read_input_tokens"] == usage.cached_tokens
    assert out["usage"]["input_tokens"] == usage.prompt_tokens - usage.cached_tokens


async def test_message_response_tool_use_and_thinking() -> None:
    chunks = await generate(body(messages=[{"role": "user", "content": "think: weather?"}], tools=[WEATHER_TOOL]))
    out = message_response(fold(chunks), message_id="msg_3", model=SIM_LARGE)
    msg = at.Message.model_validate(out)
    assert msg.stop_reason == "tool_use"
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    tool = msg.content[1]
    assert isinstance(tool, at.ToolUseBlock) and tool.name == "get_weather" and isinstance(tool.input["city"], str)


async def test_stop_sequence_and_max_tokens() -> None:
    full = "".join(c.text for c in await generate(body()))
    stop = full.split(" ")[2]
    out = message_response(fold(await generate(body(stop_sequences=[stop]))), message_id="m", model=SIM_LARGE)
    assert out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == stop
    assert stop not in out["content"][0]["text"]
    out = message_response(fold(await generate(body(max_tokens=2))), message_id="m", model=SIM_LARGE)
    assert out["stop_reason"] == "max_tokens" and out["usage"]["output_tokens"] == 2


def test_stop_reason_and_tool_input_helpers() -> None:
    assert stop_reason("abort") == "end_turn" and stop_reason("error") == "end_turn"
    assert stop_reason("stop", None) == "end_turn" and stop_reason("stop", "X") == "stop_sequence"
    assert tool_input('{"a": 1}') == {"a": 1} and tool_input("") == {}
    assert tool_input("[1]") == {"_raw": "[1]"} and tool_input("{oops") == {"_raw": "{oops"}


def test_error_bodies() -> None:
    assert error_body(401, "bad key") == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "bad key"},
    }
    assert error_body(429, "x")["error"]["type"] == "rate_limit_error"
    assert error_body(404, "x")["error"]["type"] == "not_found_error"
    assert error_body(500, "x")["error"]["type"] == "api_error"
    assert error_body(529, "x")["error"]["type"] == "overloaded_error"
    assert error_body(403, "x")["error"]["type"] == "permission_error"
    assert "hf:a/b" in model_not_found_body("hf:a/b")["error"]["message"]
    name, data = parse_sse([error_event("overloaded", "overloaded_error")])[0]
    assert name == "error" and data["error"] == {"type": "overloaded_error", "message": "overloaded"}


# ---------------------------------------------------------------- streaming


def names(events: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [n for n, _ in events]


async def test_stream_text_exact_sequence_and_sdk_types() -> None:
    chunks = await generate(body())
    events = parse_sse(encode(chunks))
    n_text = sum(1 for c in chunks if c.text)
    assert names(events) == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n_text,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    parsed = [EVENT.validate_python(d) for _, d in events]
    assert isinstance(parsed[0], at.RawMessageStartEvent)
    assert parsed[0].message.content == [] and parsed[0].message.usage.input_tokens > 0
    assert isinstance(parsed[-2], at.RawMessageDeltaEvent)
    final_usage = events[-2][1]["usage"]
    assert set(final_usage) == {
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "output_tokens",
    }
    assert final_usage["output_tokens"] == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert all(d["index"] == 0 for n, d in events if n.startswith("content_block"))


async def test_stream_thinking_then_tool_use_accumulates_in_sdk() -> None:
    chunks = await generate(body(messages=[{"role": "user", "content": "think: weather?"}], tools=[WEATHER_TOOL]))
    events = parse_sse(encode(chunks))
    n_reasoning = sum(1 for c in chunks if c.reasoning)
    assert names(events) == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * n_reasoning,
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    starts = [d for n, d in events if n == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1]
    assert starts[0]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert starts[1]["content_block"]["type"] == "tool_use" and starts[1]["content_block"]["input"] == {}
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, d in events:
        snapshot = accumulate_event(event=EVENT.validate_python(d), current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    assert snapshot.stop_reason == "tool_use"
    assert snapshot.content[0].type == "thinking"
    assert snapshot.content[0].thinking == "".join(c.reasoning for c in chunks)
    tool = snapshot.content[1]
    assert isinstance(tool, at.ToolUseBlock) and tool.name == "get_weather" and "city" in tool.input


async def test_stream_text_accumulates_to_same_message_as_non_stream() -> None:
    chunks = await generate(body(stop_sequences=["e"]))
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for _, d in parse_sse(encode(chunks)):
        snapshot = accumulate_event(event=EVENT.validate_python(d), current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    whole = at.Message.model_validate(message_response(fold(chunks), message_id="msg_1", model=SIM_LARGE))
    assert snapshot.stop_reason == whole.stop_reason == "stop_sequence"
    assert snapshot.stop_sequence == "e"
    assert [b.to_dict() for b in snapshot.content] == [b.to_dict() for b in whole.content]
    assert snapshot.usage.output_tokens == whole.usage.output_tokens


def test_stream_explicit_start_ping_and_empty_generation() -> None:
    enc = AnthropicStreamEncoder("msg_e", SIM_SMALL)
    assert enc.ping() == [": ping\n\n"]
    frames = enc.start(TokenUsage(10, 4, 0))
    frames += enc.ping()
    frames += enc.chunk(GenerationChunk(usage=TokenUsage(10, 4, 0)))
    frames += enc.finish(TokenUsage(10, 4, 0), finish_reason="abort")
    events = parse_sse(frames)
    assert names(events) == ["message_start", "ping", "message_delta", "message_stop"]
    assert events[0][1]["message"]["usage"]["input_tokens"] == 6
    assert events[0][1]["message"]["usage"]["cache_read_input_tokens"] == 4
    assert events[2][1]["usage"]["input_tokens"] == 6 and events[2][1]["usage"]["cache_read_input_tokens"] == 4
    for name, data in events:
        if name != "ping":
            EVENT.validate_python(data)
