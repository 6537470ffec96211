"""OpenAI wire models, converters and stream encoders, checked against the official SDK's types."""

from __future__ import annotations

import base64
import json
import struct
from typing import Any

import openai.types as oa
import pydantic
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from serve_apps.engines.sim import SIM_EMBED, SIM_LARGE, SIM_SMALL, SimulatedEngine
from serve_apps.engines.types import GenerationChunk, ModelCard, TokenUsage, ToolCall
from serve_apps.protocols.common import GenerationResult, InvalidRequest
from serve_apps.protocols.openai_convert import (
    chat_response,
    chat_to_generation,
    completion_response,
    completion_to_generation,
    embeddings_response,
    embeddings_to_request,
    error_body,
    format_usd,
    model_not_found_body,
    models_list,
)
from serve_apps.protocols.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    validation_message,
)
from serve_apps.protocols.openai_stream import (
    DONE,
    OpenAIChatStreamEncoder,
    OpenAICompletionStreamEncoder,
    error_event,
)

CARDS = {c.id: c for c in SimulatedEngine().cards()}
LARGE: ModelCard = CARDS[SIM_LARGE]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def chat_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": SIM_LARGE, "messages": [{"role": "user", "content": "hello"}]}
    body.update(overrides)
    return body


def error_of(model: type[pydantic.BaseModel], body: dict[str, Any]) -> tuple[str, str | None]:
    with pytest.raises(pydantic.ValidationError) as info:
        model.model_validate(body)
    return validation_message(info.value)


def parse_sse(frames: list[str]) -> list[Any]:
    """Each frame is exactly `data: <json>\\n\\n`; returns the payloads ("[DONE]" kept as a string)."""
    out: list[Any] = []
    for frame in frames:
        assert frame.startswith("data: ") and frame.endswith("\n\n")
        payload = frame[len("data: ") : -2]
        assert "\n" not in payload
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


async def generate(body: dict[str, Any], rid: str = "req-1") -> tuple[ChatCompletionRequest, list[GenerationChunk]]:
    req = ChatCompletionRequest.model_validate(body)
    engine = SimulatedEngine()
    gen_req = chat_to_generation(req, rid, CARDS[req.model])
    return req, [c async for c in engine.generate(gen_req)]


def fold(chunks: list[GenerationChunk]) -> GenerationResult:
    result = GenerationResult()
    for c in chunks:
        result.add(c)
    return result


# ---------------------------------------------------------------- request parsing


def test_chat_request_accepts_sdk_shapes_and_unknown_fields() -> None:
    req = ChatCompletionRequest.model_validate(
        chat_body(
            messages=[
                {"role": "developer", "content": "be terse"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
            ],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "get_weather"}},
            stop="END",
            max_completion_tokens=50,
            max_tokens=9999,
            stream=True,
            stream_options={"include_usage": True},
            n=1,
            seed=3,
            some_future_sdk_field={"x": 1},
            reasoning_effort="low",
        )
    )
    assert req.include_usage and req.stop == ["END"]
    gen = chat_to_generation(req, "rid", LARGE)
    assert gen.sampling.max_tokens == 50  # max_completion_tokens wins over max_tokens
    assert gen.sampling.stop == ("END",) and gen.sampling.seed == 3
    assert [m.role for m in gen.messages] == ["system", "user", "assistant", "tool"]
    assert gen.messages[1].content == "a\nb"
    assert gen.messages[2].tool_calls == (ToolCall("call_1", "get_weather", "{}"),)
    assert gen.messages[3].tool_call_id == "call_1"
    assert gen.tools[0].name == "get_weather" and gen.tools[0].parameters["required"] == ["city"]
    assert gen.tool_choice == {"name": "get_weather"}


def test_penalties_and_vllm_sampling_extras_reach_the_engine() -> None:
    plain = chat_to_generation(ChatCompletionRequest.model_validate(chat_body()), "r", LARGE).sampling
    assert (plain.top_k, plain.min_p, plain.presence_penalty, plain.frequency_penalty,
            plain.repetition_penalty) == (0, 0.0, 0.0, 0.0, 1.0)
    req = ChatCompletionRequest.model_validate(chat_body(presence_penalty=0.5, frequency_penalty=-1.5, top_k=40,
                                                         min_p=0.05, repetition_penalty=1.2))
    s = chat_to_generation(req, "r", LARGE).sampling
    assert (s.top_k, s.min_p, s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (
        40, 0.05, 0.5, -1.5, 1.2)
    assert chat_to_generation(ChatCompletionRequest.model_validate(chat_body(top_k=-1)), "r", LARGE).sampling.top_k == 0
    comp = CompletionRequest.model_validate({"model": SIM_SMALL, "prompt": "x", "frequency_penalty": 1})
    assert completion_to_generation(comp, "r", CARDS[SIM_SMALL]).sampling.frequency_penalty == 1.0


def test_max_tokens_default_and_clamp() -> None:
    assert chat_to_generation(ChatCompletionRequest.model_validate(chat_body()), "r", LARGE).sampling.max_tokens == 4096
    big = ChatCompletionRequest.model_validate(chat_body(max_tokens=100_000))
    assert chat_to_generation(big, "r", LARGE).sampling.max_tokens == 4096
    comp = CompletionRequest.model_validate({"model": SIM_SMALL, "prompt": "x"})
    assert completion_to_generation(comp, "r", CARDS[SIM_SMALL]).sampling.max_tokens == 16


@pytest.mark.parametrize(
    ("body", "param", "needle"),
    [
        (chat_body(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
         "messages[0].content", "image_url"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Missing required parameter"),
        (chat_body(messages=[]), "messages", "at least 1"),
        (chat_body(messages=[{"role": "tool", "content": "x"}]), "messages[0]", "tool_call_id"),
        (chat_body(messages=[{"role": "function", "content": "x"}]), "messages[0].role", "'assistant'"),
        (chat_body(messages=[{"role": "user"}]), "messages[0]", "needs 'content'"),
        (chat_body(n=2), "n", "n=1"),
        (chat_body(temperature=2.5), "temperature", "less than or equal to 2"),
        (chat_body(top_p=0), "top_p", "greater than 0"),
        (chat_body(max_tokens=0), "max_tokens", "greater than or equal to 1"),
        (chat_body(presence_penalty=2.5), "presence_penalty", "less than or equal to 2"),
        (chat_body(frequency_penalty=-3), "frequency_penalty", "greater than or equal to -2"),
        (chat_body(repetition_penalty=0), "repetition_penalty", "greater than 0"),
        (chat_body(logprobs=True), "logprobs", "not supported"),
        (chat_body(response_format={"type": "json_schema"}), "response_format", "needs a 'json_schema'"),
        (chat_body(response_format={"type": "xml"}), "response_format.type", "'json_schema'"),
        (chat_body(stop=[1]), "stop", "array of strings"),
        (chat_body(tool_choice={"type": "function"}), "tool_choice", "must be"),
        (chat_body(tools=[{"type": "function", "function": {"description": "no name"}}]),
         "tools[0].function.name", "Missing"),
    ],
)  # fmt: skip
def test_chat_request_validation_messages_name_the_field(body: dict[str, Any], param: str, needle: str) -> None:
    message, got_param = error_of(ChatCompletionRequest, body)
    assert got_param == param
    assert needle in message
    assert "Value error" not in message and "pydantic" not in message


def test_non_object_body_message() -> None:
    with pytest.raises(pydantic.ValidationError) as info:
        ChatCompletionRequest.model_validate([1, 2])
    assert validation_message(info.value) == ("The request body must be a JSON object.", None)


def test_tool_choice_semantic_errors_are_invalid_request() -> None:
    named = ChatCompletionRequest.model_validate(
        chat_body(tools=[WEATHER_TOOL], tool_choice={"type": "function", "function": {"name": "nope"}})
    )
    with pytest.raises(InvalidRequest) as info:
        chat_to_generation(named, "r", LARGE)
    assert info.value.param == "tool_choice" and "nope" in info.value.message
    with pytest.raises(InvalidRequest):
        chat_to_generation(ChatCompletionRequest.model_validate(chat_body(tool_choice="required")), "r", LARGE)


def test_completion_and_embedding_request_validation() -> None:
    assert CompletionRequest.model_validate({"model": "m", "prompt": ["one"]}).prompt == ["one"]
    msg, param = error_of(CompletionRequest, {"model": "m", "prompt": [1, 2, 3]})
    assert param == "prompt" and "token-id" in msg
    msg, param = error_of(CompletionRequest, {"model": "m", "prompt": ["a", "b"]})
    assert param == "prompt" and "one prompt" in msg
    _, param = error_of(CompletionRequest, {"model": "m", "prompt": "x", "echo": True})
    assert param == "echo"

    assert EmbeddingsRequest.model_validate({"model": "m", "input": "hi"}).input == ["hi"]
    msg, param = error_of(EmbeddingsRequest, {"model": "m", "input": [[1, 2]]})
    assert param == "input" and "token-id" in msg
    _, param = error_of(EmbeddingsRequest, {"model": "m", "input": []})
    assert param == "input"
    _, param = error_of(EmbeddingsRequest, {"model": "m", "input": "x", "encoding_format": "int8"})
    assert param == "encoding_format"
    with pytest.raises(InvalidRequest):
        embeddings_to_request(EmbeddingsRequest.model_validate({"model": "m", "input": "x", "dimensions": 3}), "r", 64)


# ---------------------------------------------------------------- responses


async def test_chat_response_parses_with_sdk_and_always_has_cached_tokens() -> None:
    req, chunks = await generate(chat_body())
    body = chat_response(fold(chunks), response_id="chatcmpl-1", model=req.model, created=1700000000)
    parsed = ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.content and parsed.choices[0].finish_reason == "stop"
    assert parsed.usage is not None and parsed.usage.prompt_tokens_details is not None
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    assert "reasoning_content" not in body["choices"][0]["message"]


async def test_chat_response_tool_call_and_reasoning() -> None:
    req, chunks = await generate(
        chat_body(messages=[{"role": "user", "content": "think: weather?"}], tools=[WEATHER_TOOL])
    )
    body = chat_response(fold(chunks), response_id="chatcmpl-2", model=req.model, created=1)
    parsed = ChatCompletion.model_validate(body)
    choice = parsed.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert body["choices"][0]["message"]["content"] is None
    assert body["choices"][0]["message"]["reasoning_content"]
    tool_calls = choice.message.tool_calls or []
    assert len(tool_calls) == 1
    call = tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_finish_reason_mapping_for_abort_and_length() -> None:
    r = GenerationResult(text="x", finish_reason="abort", usage=TokenUsage(3, 0, 1))
    assert chat_response(r, response_id="a", model="m", created=0)["choices"][0]["finish_reason"] == "stop"
    r = GenerationResult(text="x", finish_reason="length", usage=TokenUsage(3, 2, 1))
    body = chat_response(r, response_id="a", model="m", created=0)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == 2


def test_completion_response_parses_with_sdk() -> None:
    r = GenerationResult(text=" world", finish_reason="length", usage=TokenUsage(4, 0, 2))
    body = completion_response(r, response_id="cmpl-1", model=SIM_SMALL, created=5)
    parsed = oa.Completion.model_validate(body)
    assert parsed.choices[0].text == " world" and parsed.choices[0].finish_reason == "length"
    assert body["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}


async def test_embeddings_float_and_base64() -> None:
    engine = SimulatedEngine()
    req = EmbeddingsRequest.model_validate({"model": SIM_EMBED, "input": ["a b", "c"]})
    result = await engine.embed(embeddings_to_request(req, "r", 64))
    floats = embeddings_response(result, model=SIM_EMBED)
    parsed = oa.CreateEmbeddingResponse.model_validate(floats)
    assert [d.index for d in parsed.data] == [0, 1] and len(parsed.data[0].embedding) == 64
    assert parsed.usage.prompt_tokens == 3
    b64 = embeddings_response(result, model=SIM_EMBED, encoding_format="base64")
    raw = base64.b64decode(b64["data"][0]["embedding"])
    decoded = struct.unpack("<64f", raw)
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)


def test_models_list() -> None:
    weights = {SIM_LARGE: 1.0, SIM_SMALL: 2.0 / 3.4}
    body = models_list(CARDS.values(), weights, warm={SIM_LARGE: True}, created=10)
    page = oa.Model.model_validate(body["data"][0])
    assert page.object == "model"
    by_id = {m["id"]: m for m in body["data"]}
    assert body["object"] == "list" and set(by_id) == {SIM_LARGE, SIM_SMALL, SIM_EMBED}
    large = by_id[SIM_LARGE]
    assert large["pricing"]["input_per_million"] == "$1.20"
    assert large["pricing"]["output_per_million"] == "$3.40"
    assert large["pricing"]["output_per_million_usd"] == 3.4
    assert large["pricing"]["input_micro_per_million"] == 1_200_000
    assert large["request_weight"] == 1.0 and large["warm"] is True
    assert large["size_class"] == "standard" and large["context_length"] == 32768
    assert large["max_output_tokens"] == 4096 and large["owned_by"] == "packserve"
    assert large["features"]["tools"] and large["features"]["reasoning"] and not large["features"]["embeddings"]
    assert by_id[SIM_SMALL]["features"]["reasoning"] is False
    assert by_id[SIM_SMALL]["features"]["structured_outputs"] is False  # listed, so clients can test for it
    assert by_id[SIM_SMALL]["request_weight"] == pytest.approx(0.588, abs=1e-3)
    assert by_id[SIM_EMBED]["request_weight"] == 0.0 and by_id[SIM_EMBED]["pricing"]["input_per_million"] == "$0.00"
    assert "warm" not in by_id[SIM_SMALL]
    json.dumps(body, allow_nan=False)


def test_format_usd() -> None:
    assert format_usd(1_200_000) == "$1.20"
    assert format_usd(75_000) == "$0.075"
    assert format_usd(0) == "$0.00"
    assert format_usd(24_000_000) == "$24.00"


def test_error_bodies() -> None:
    body = error_body(400, "bad", param="messages[0]")
    assert body == {"error": {"message": "bad", "type": "invalid_request_error", "code": None, "param": "messages[0]"}}
    assert error_body(401, "no key")["error"]["type"] == "authentication_error"
    assert error_body(429, "slow down", code="request_bar_empty")["error"] == {
        "message": "slow down",
        "type": "requests",
        "code": "request_bar_empty",
        "param": None,
    }
    assert error_body(429, "weekly", type_="tokens")["error"]["type"] == "tokens"
    nf = model_not_found_body("hf:x/y")["error"]
    assert nf["code"] == "model_not_found" and nf["type"] == "invalid_request_error"
    assert "hf:x/y" in nf["message"] and "/models" in nf["message"]


# ---------------------------------------------------------------- streaming


async def test_chat_stream_sequence_and_sdk_parsing() -> None:
    req, chunks = await generate(chat_body(stream=True, stream_options={"include_usage": True}))
    enc = OpenAIChatStreamEncoder("chatcmpl-s", req.model, created=42)
    frames = enc.start()
    for c in chunks:
        frames += enc.chunk(c)
    frames += enc.finish(include_usage=req.include_usage)
    payloads = parse_sse(frames)
    assert payloads[-1] == "[DONE]" and frames[-1] == DONE
    events = [ChatCompletionChunk.model_validate(p) for p in payloads[:-1]]
    assert events[0].choices[0].delta.role == "assistant"
    assert all(e.id == "chatcmpl-s" and e.created == 42 for e in events)
    finish_events = [e for e in events if e.choices and e.choices[0].finish_reason]
    assert len(finish_events) == 1 and finish_events[0].choices[0].finish_reason == "stop"
    usage_event = events[-1]
    assert usage_event.choices == [] and usage_event.usage is not None
    assert payloads[-2]["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == "".join(c.text for c in chunks)
    assert usage_event.usage.completion_tokens == chunks[-1].usage.completion_tokens  # type: ignore[union-attr]
    # No usage chunk unless asked, still exactly one [DONE].
    enc2 = OpenAIChatStreamEncoder("x", req.model, created=0)
    tail = parse_sse(enc2.finish(TokenUsage(1, 0, 1)))
    assert tail[-1] == "[DONE]" and all(p == "[DONE]" or p["choices"] for p in tail)
    assert enc2.finish() == []


async def test_chat_stream_tool_calls_and_reasoning_accumulate_in_sdk() -> None:
    req, chunks = await generate(
        chat_body(messages=[{"role": "user", "content": "think about the weather"}], tools=[WEATHER_TOOL], stream=True)
    )
    enc = OpenAIChatStreamEncoder("chatcmpl-t", req.model, created=1)
    frames = enc.start() + [f for c in chunks for f in enc.chunk(c)] + enc.finish()
    payloads = parse_sse(frames)
    reasoning = "".join(p["choices"][0]["delta"].get("reasoning_content", "") for p in payloads[:-1])
    assert reasoning == "".join(c.reasoning for c in chunks) != ""
    state: ChatCompletionStreamState[Any] = ChatCompletionStreamState(input_tools=[WEATHER_TOOL])  # type: ignore[list-item]
    for p in payloads[:-1]:
        list(state.handle_chunk(ChatCompletionChunk.model_validate(p)))
    final = state.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    calls = final.choices[0].message.tool_calls or []
    assert len(calls) == 1
    assert calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments)


def test_chat_stream_error_event() -> None:
    frame = error_event("engine died", "server_error", "engine_error")
    (payload,) = parse_sse([frame])
    assert payload == {
        "error": {"message": "engine died", "type": "server_error", "code": "engine_error", "param": None}
    }


async def test_completion_stream() -> None:
    req = CompletionRequest.model_validate({"model": SIM_SMALL, "prompt": "def f():", "max_tokens": 5, "stream": True})
    engine = SimulatedEngine()
    chunks = [c async for c in engine.generate(completion_to_generation(req, "c", CARDS[SIM_SMALL]))]
    enc = OpenAICompletionStreamEncoder("cmpl-1", req.model, created=3)
    frames = enc.start() + [f for c in chunks for f in enc.chunk(c)] + enc.finish(include_usage=True)
    payloads = parse_sse(frames)
    assert payloads[-1] == "[DONE]"
    # The SDK's Completion type has a non-null finish_reason, yet OpenAI itself streams
    # null until the end (the SDK builds stream chunks without validating), so
    # intermediate chunks are checked with the null swapped for a valid value.
    for p in payloads[:-3]:
        assert p["choices"][0]["finish_reason"] is None
        p["choices"][0]["finish_reason"] = "stop"
    parsed = [oa.Completion.model_validate(p) for p in payloads[:-1]]
    assert "".join(p.choices[0].text for p in parsed if p.choices) == "".join(c.text for c in chunks)
    assert parsed[-2].choices[0].finish_reason == "length"
    assert parsed[-1].choices == [] and parsed[-1].usage is not None and parsed[-1].usage.completion_tokens == 5
