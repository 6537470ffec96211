"""The gateway driven only through the official `openai` SDK (sync and async, streaming and not).

One live gateway (uvicorn, simulated engine, the session Redis) serves the
whole module; every test makes its own account. The simulated engine is
deterministic, so token counts, cached tokens and costs are asserted exactly:
the expected prompt is rendered and tokenized the way the engine does it.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from serve_apps.engines.sim import tokenize
from serve_apps.engines.types import ChatMessage
from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway
from tests.sim_expect import (
    BLOCK,
    EMBED,
    LARGE,
    SMALL,
    cost_pico,
    expected_cached,
    long_text,
    prompt_tokens,
    unique,
    wait_events,
)

# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    # A short queue so back-to-back requests of one account never race the previous settlement.
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-openai"),
                     queue_timeout_s=5) as g:
        yield g


@pytest.fixture
def account(gw: LiveGateway) -> tuple[str, str]:
    """(account id, key) of a fresh 1-standard-pack account."""
    return gw.new_key(["standard"])


def client_for(gw: LiveGateway, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}{prefix}", api_key=key, max_retries=0, timeout=30)


def async_client_for(gw: LiveGateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=30)


def assert_billed(event: dict[str, Any], model: str, prompt: int, cached: int, completion: int) -> None:
    assert event["model"] == model
    assert event["status"] == "ok"
    assert (event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"]) == (prompt, cached, completion)
    assert event["cost_pico"] == cost_pico(model, prompt, cached, completion)
    if model == LARGE:
        assert event["cost_pico"] > 0
        assert event["weight"] == 1.0


def as_dict(model: Any) -> dict[str, Any]:
    """An SDK object with its extra (non-OpenAI) fields, e.g. `reasoning_content`, `pricing`."""
    return dict(model.to_dict())


def bars(gw: LiveGateway, key: str) -> tuple[Any, str]:
    q = gw.quotas(key)
    return q["rollingFiveHourLimit"]["remaining"], q["weeklyTokenLimit"]["remainingCredits"]


WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}


# -- models ------------------------------------------------------------------------------------

def test_models_list_has_the_sim_catalog_with_pricing_and_weights(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    for prefix in ("/v1", "/openai/v1"):
        models = {m.id: m for m in client_for(gw, key, prefix).models.list()}
        assert set(models) == {LARGE, SMALL, EMBED}
        for m in models.values():
            extra = as_dict(m)
            assert m.owned_by
            for field in ("pricing", "request_weight", "size_class", "context_length", "max_output_tokens",
                          "features"):
                assert field in extra, (m.id, field)
        large, small, embed = (as_dict(models[i]) for i in (LARGE, SMALL, EMBED))
        assert large["pricing"]["input_per_million"] == "$1.20"
        assert large["pricing"]["output_per_million"] == "$3.40"
        assert small["pricing"]["output_per_million_usd"] == 2.0
        assert large["request_weight"] == 1.0
        assert small["request_weight"] == pytest.approx(2.0 / 3.4, rel=1e-12)
        assert embed["request_weight"] == 0.0
        assert (large["size_class"], small["size_class"], embed["size_class"]) == ("standard", "small", "unmetered")
        assert large["context_length"] == 32768 and large["max_output_tokens"] == 4096
        assert large["features"]["tools"] is True and large["features"]["reasoning"] is True
        assert small["features"]["reasoning"] is False
        assert embed["features"]["embeddings"] is True
    one = client_for(gw, key).models.retrieve(LARGE)
    assert one.id == LARGE and as_dict(one)["request_weight"] == 1.0


def test_a_presented_invalid_key_is_401_on_every_endpoint_the_models_list_included(
        gw: LiveGateway, account: tuple[str, str]) -> None:
    """Tools "test the connection" by listing models: a mistyped key must fail there, not on the first request."""
    _, key = account
    for wrong in ("sk-not-a-packserve-key", key + "x"):
        for prefix in ("/v1", "/openai/v1"):
            client = client_for(gw, wrong, prefix)
            with pytest.raises(openai.AuthenticationError) as err:
                client.models.list()
            assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
            with pytest.raises(openai.AuthenticationError):
                client.models.retrieve(LARGE)
            with pytest.raises(openai.AuthenticationError):
                client.models.retrieve("hf:no-such/model")  # the key is checked before the model
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}])
            with pytest.raises(openai.AuthenticationError):
                client.completions.create(model=LARGE, prompt="hi")
            with pytest.raises(openai.AuthenticationError):
                client.embeddings.create(model=EMBED, input="hi")
        anthropic_client = anthropic.Anthropic(base_url=gw.base_url, api_key=wrong, max_retries=0, timeout=30)
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client.messages.create(model=LARGE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.AuthenticationError):
            anthropic_client.messages.count_tokens(model=LARGE, messages=[{"role": "user", "content": "hi"}])
        quotas = httpx.get(f"{gw.base_url}/v2/quotas", headers={"authorization": f"Bearer {wrong}"}, timeout=30)
        assert quotas.status_code == 401 and quotas.json()["error"]["code"] == "invalid_api_key"
    # No key at all: the catalog stays public (SPEC §2), the rest still needs one.
    public = httpx.get(f"{gw.base_url}/v1/models", timeout=30)
    assert public.status_code == 200 and {m["id"] for m in public.json()["data"]} == {LARGE, SMALL, EMBED}
    assert httpx.get(f"{gw.base_url}/v1/models/{LARGE}", timeout=30).status_code == 200
    assert client_for(gw, key).models.list().data  # the valid key still lists


# -- chat ------------------------------------------------------------------------------------

def test_chat_non_stream_counts_and_bills_exactly(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('fresh')} explain the cache"
    messages = [ChatMessage("system", "You are terse."), ChatMessage("user", question)]
    resp = client_for(gw, key).chat.completions.create(
        model=LARGE, messages=[{"role": "system", "content": "You are terse."}, {"role": "user", "content": question}])
    choice = resp.choices[0]
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion" and resp.model == LARGE
    assert choice.finish_reason == "stop" and choice.message.role == "assistant"
    assert choice.message.content and choice.message.tool_calls is None
    usage = resp.usage
    assert usage is not None
    assert usage.prompt_tokens == len(prompt_tokens(messages))
    assert usage.completion_tokens == len(tokenize(choice.message.content))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, usage.prompt_tokens, 0, usage.completion_tokens)


def test_chat_stream_with_include_usage_ends_with_the_usage_chunk(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('stream')} write a line"
    stream = client_for(gw, key).chat.completions.create(
        model=LARGE, messages=[{"role": "user", "content": question}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.prompt_tokens == len(prompt_tokens([ChatMessage("user", question)]))
    assert last.usage.completion_tokens == len(tokenize(text)) > 0
    assert last.usage.prompt_tokens_details is not None and last.usage.prompt_tokens_details.cached_tokens == 0
    assert len({c.id for c in chunks}) == 1
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, last.usage.prompt_tokens, 0, last.usage.completion_tokens)


def test_chat_stream_without_include_usage_is_still_billed(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('nousage')} go"
    chunks = list(client_for(gw, key).chat.completions.create(
        model=LARGE, messages=[{"role": "user", "content": question}], stream=True))
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    [event] = wait_events(gw, account_id, 1)  # no "$0 for streams"
    assert_billed(event, LARGE, len(prompt_tokens([ChatMessage("user", question)])), 0, len(tokenize(text)))


def test_max_tokens_and_stop_are_honoured(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    messages: Any = [{"role": "user", "content": f"{unique('len')} say a lot"}]
    short = client.chat.completions.create(model=SMALL, messages=messages, max_completion_tokens=3)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3
    full = client.chat.completions.create(model=SMALL, messages=messages, max_tokens=200)
    text = full.choices[0].message.content or ""
    stop = text.split()[2]
    stopped = client.chat.completions.create(model=SMALL, messages=messages, max_tokens=200, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == text[:text.find(stop)]
    events = wait_events(gw, account_id, 3)
    assert full.usage is not None and stopped.usage is not None
    assert [e["completion_tokens"] for e in events] == [3, full.usage.completion_tokens,
                                                        stopped.usage.completion_tokens]
    assert stopped.usage.completion_tokens < full.usage.completion_tokens
    assert all(e["cost_pico"] > 0 and e["weight"] == pytest.approx(2.0 / 3.4) for e in events)


# -- completions --------------------------------------------------------------------------------

def test_completions_non_stream_and_stream(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    prompt = f"{unique('legacy')} def main():"
    resp = client.completions.create(model=LARGE, prompt=prompt, max_tokens=5)
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (len(tokenize(prompt)), 5)
    assert len(tokenize(resp.choices[0].text)) == 5
    # Default max_tokens is 16, as in OpenAI's API; the same prompt now hits the cache.
    chunks = list(client.completions.create(model=LARGE, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed.startswith(resp.choices[0].text)
    usage = chunks[-1].usage
    assert usage is not None and chunks[-1].choices == []
    assert usage.completion_tokens == len(tokenize(streamed)) <= 16
    cached = expected_cached(tokenize(prompt) + tokenize(resp.choices[0].text), tokenize(prompt))
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == cached
    first, second = wait_events(gw, account_id, 2)
    assert_billed(first, LARGE, len(tokenize(prompt)), 0, 5)
    assert_billed(second, LARGE, len(tokenize(prompt)), cached, usage.completion_tokens)


# -- embeddings ---------------------------------------------------------------------------------

def test_embeddings_float_and_base64_are_free(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    inputs = ["hello world", "def f(x): return x"]
    floats = client.embeddings.create(model=EMBED, input=inputs, encoding_format="float")
    assert [d.index for d in floats.data] == [0, 1] and floats.model == EMBED
    vectors = [d.embedding for d in floats.data]
    assert all(len(v) == 64 for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-9) for v in vectors)
    assert vectors[0] != vectors[1]
    assert floats.usage.prompt_tokens == sum(len(tokenize(t)) for t in inputs)
    raw = client.embeddings.create(model=EMBED, input=inputs, encoding_format="base64")
    for d, v in zip(raw.data, vectors, strict=True):
        assert isinstance(d.embedding, str)
        decoded = struct.unpack("<64f", base64.b64decode(d.embedding))
        assert decoded == pytest.approx(v, abs=1e-6)
    # No encoding_format: the SDK asks for base64 and decodes it itself.
    default = client.embeddings.create(model=EMBED, input="hello world")
    assert default.data[0].embedding == pytest.approx(vectors[0], abs=1e-6)
    events = wait_events(gw, account_id, 3)
    assert all(e["model"] == EMBED and e["cost_pico"] == 0 and e["weight"] == 0 for e in events)
    assert [e["prompt_tokens"] for e in events] == [floats.usage.prompt_tokens] * 2 + [len(tokenize("hello world"))]
    assert bars(gw, key) == (500, "$24.00")


# -- tools ---------------------------------------------------------------------------------------

def test_tool_call_round_trip(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    messages: list[Any] = [{"role": "user", "content": f"What is the weather in {unique('Paris')} today?"}]
    first = client.chat.completions.create(model=LARGE, messages=messages, tools=[WEATHER_TOOL])
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    args = json.loads(call.function.arguments)
    assert set(args) == {"city", "unit"} and isinstance(args["city"], str) and args["unit"] == "celsius"
    assert first.usage is not None and first.usage.completion_tokens == len(tokenize("get_weather "
                                                                                      + call.function.arguments))
    messages.append(choice.message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21, "sky": "clear"}'})
    # tool_choice stays "auto": a tool result is answered in words, not with another call.
    second = client.chat.completions.create(model=LARGE, messages=messages, tools=[WEATHER_TOOL])
    answer = second.choices[0]
    assert answer.finish_reason == "stop" and answer.message.tool_calls is None and answer.message.content
    # The whole first prompt is reused from the cache.
    assert second.usage is not None and second.usage.prompt_tokens_details is not None
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens // BLOCK * BLOCK
    # Streaming: the SDK's accumulator sees one complete call.
    with client.chat.completions.stream(model=LARGE, messages=messages[:1], tools=[WEATHER_TOOL]) as s:
        final = s.get_final_completion()
    [streamed_call] = final.choices[0].message.tool_calls or []
    assert final.choices[0].finish_reason == "tool_calls"
    assert streamed_call.function.name == "get_weather"
    assert json.loads(streamed_call.function.arguments)["unit"] == "celsius"
    events = wait_events(gw, account_id, 3)
    assert all(e["cost_pico"] > 0 and e["status"] == "ok" for e in events)


# -- prefix cache ------------------------------------------------------------------------------

def test_cached_tokens_on_a_repeated_long_prefix(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    system = long_text(320, unique("ctx"))
    asks = ["first question about it", "second question about it"]
    usages: list[Any] = []
    for ask in asks:
        raw = client.chat.completions.with_raw_response.create(
            model=LARGE, messages=[{"role": "system", "content": system}, {"role": "user", "content": ask}],
            max_tokens=4)
        body = json.loads(raw.text)
        assert "cached_tokens" in body["usage"]["prompt_tokens_details"]  # present, 0 included
        usages.append(raw.parse().usage)
    toks = [prompt_tokens([ChatMessage("system", system), ChatMessage("user", a)]) for a in asks]
    assert len(toks[0]) > 330
    fresh, repeat = usages
    assert fresh.prompt_tokens == len(toks[0]) and fresh.prompt_tokens_details.cached_tokens == 0
    assert repeat.prompt_tokens == len(toks[1])
    cached = expected_cached(toks[0], toks[1])
    assert cached >= 320
    assert repeat.prompt_tokens_details.cached_tokens == cached
    first, second = wait_events(gw, account_id, 2)
    assert_billed(first, LARGE, fresh.prompt_tokens, 0, fresh.completion_tokens)
    assert_billed(second, LARGE, repeat.prompt_tokens, cached, repeat.completion_tokens)
    assert second["cost_pico"] < first["cost_pico"]  # the 80% cache-read discount


# -- reasoning ---------------------------------------------------------------------------------

REASONING_WORDS = {"first", "check", "the", "question", "then", "plan", "an", "answer", "step", "by"}


def test_reasoning_content_for_a_think_prompt(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    messages: Any = [{"role": "user", "content": f"{unique('r')} think before you answer"}]
    resp = client.chat.completions.create(model=LARGE, messages=messages)
    message = as_dict(resp.choices[0].message)
    reasoning = message["reasoning_content"]
    assert reasoning and set(reasoning.split()) <= REASONING_WORDS
    assert message["content"]
    assert resp.usage is not None
    assert resp.usage.completion_tokens == len(tokenize(reasoning)) + len(tokenize(message["content"]))
    deltas = [as_dict(c.choices[0].delta) for c in client.chat.completions.create(
        model=LARGE, messages=messages, stream=True) if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == reasoning
    assert "".join(d.get("content") or "" for d in deltas) == message["content"]
    # sim-small has no reasoning.
    small = as_dict(client.chat.completions.create(model=SMALL, messages=messages).choices[0].message)
    assert small.get("reasoning_content") is None
    wait_events(gw, account_id, 3)


# -- quota headers -----------------------------------------------------------------------------

def test_both_bars_in_headers_decrease_across_calls(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    messages: Any = [{"role": "user", "content": f"{unique('hdr')} hello"}]
    first = client.chat.completions.with_raw_response.create(model=LARGE, messages=messages)
    assert first.headers["x-ratelimit-limit-requests"] == "500"
    assert first.headers["x-ratelimit-remaining-requests"] == "499"
    assert first.headers["x-packserve-weekly-remaining-usd"] == "24.000000"
    assert first.headers["x-packserve-weekly-limit-usd"] == "24.00"
    [event] = wait_events(gw, account_id, 1)
    with client.chat.completions.with_streaming_response.create(model=LARGE, messages=messages, stream=True) as s:
        assert s.headers["x-ratelimit-remaining-requests"] == "498"
        weekly = s.headers["x-packserve-weekly-remaining-usd"]
        assert weekly == f"{(24 * 10**12 - event['cost_pico']) / 10**12:.6f}"
        assert float(weekly) < 24
        assert "data: [DONE]" in s.read().decode()
    events = wait_events(gw, account_id, 2)
    third = client.chat.completions.with_raw_response.create(model=SMALL, messages=messages)
    assert float(third.headers["x-packserve-requests-remaining"]) == pytest.approx(498 - 2.0 / 3.4, abs=1e-4)
    spent = sum(e["cost_pico"] for e in events)
    assert third.headers["x-packserve-weekly-remaining-usd"] == f"{(24 * 10**12 - spent) / 10**12:.6f}"


# -- typed errors -------------------------------------------------------------------------------

def test_bad_key_is_authentication_error(gw: LiveGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(gw, "ps-not-a-real-key").chat.completions.create(
            model=LARGE, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(gw, "ps-not-a-real-key").embeddings.create(model=EMBED, input="x")


def test_unknown_model_is_not_found_naming_the_id(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    client = client_for(gw, key)
    for model in ("hf:no/such-model", "hf:packserve/SIM-LARGE"):  # matched exactly, case-sensitive
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 404 and err.value.code == "model_not_found"
        assert model in err.value.message and "GET /v1/models" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="hf:no/such-embedder", input="x")
    assert bars(gw, key) == (500, "$24.00")


@pytest.mark.parametrize("case", ["empty_messages", "n_2", "temperature_5", "image_part", "embed_model_for_chat",
                                  "logprobs", "json_object_unsupported", "json_schema_without_schema"])
def test_bad_requests_are_bad_request_errors_and_free(gw: LiveGateway, account: tuple[str, str], case: str) -> None:
    account_id, key = account
    client = client_for(gw, key)
    user: Any = [{"role": "user", "content": "hi"}]
    kwargs: dict[str, Any] = {
        "empty_messages": {"model": LARGE, "messages": []},
        "n_2": {"model": LARGE, "messages": user, "n": 2},
        "temperature_5": {"model": LARGE, "messages": user, "temperature": 5},
        "image_part": {"model": LARGE, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]},
        "embed_model_for_chat": {"model": EMBED, "messages": user},
        # Refused, never ignored: the client would read logprobs or parse JSON that is not there.
        "logprobs": {"model": LARGE, "messages": user, "logprobs": True, "top_logprobs": 2},
        "json_object_unsupported": {"model": LARGE, "messages": user, "response_format": {"type": "json_object"}},
        "json_schema_without_schema": {"model": LARGE, "messages": user, "response_format": {"type": "json_schema"}},
    }[case]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**kwargs)
    assert err.value.status_code == 400 and err.value.message
    assert "Traceback" not in err.value.response.text
    expected_param = {"empty_messages": "messages", "n_2": "n", "temperature_5": "temperature",
                      "embed_model_for_chat": "model", "logprobs": "logprobs",
                      "json_object_unsupported": "response_format",
                      "json_schema_without_schema": "response_format"}.get(case)
    if expected_param is not None:
        assert err.value.param == expected_param, err.value.body
    assert bars(gw, key) == (500, "$24.00")
    assert gw.usage_events(account_id) == []


def test_response_format_text_is_plain_output(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    chat = client_for(gw, key).chat.completions.create(
        model=LARGE, messages=[{"role": "user", "content": "hi"}], response_format={"type": "text"}, logprobs=False)
    assert chat.choices[0].message.content


def test_prompt_over_the_context_is_context_length_exceeded_and_free(gw: LiveGateway,
                                                                     account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    text = long_text(33_000, unique("ctx"))  # the sim models' context is 32768 tokens
    chat_tokens = len(prompt_tokens([ChatMessage("user", text)]))
    # Streaming too: the error comes before the stream starts, as an HTTP 400.
    with pytest.raises(openai.BadRequestError) as chat:
        client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": text}], stream=True)
    assert (chat.value.code, chat.value.param) == ("context_length_exceeded", "messages")
    assert chat.value.message.endswith(f"This model's maximum context length is 32768 tokens. However, your messages "
                                  f"resulted in {chat_tokens} tokens. Please reduce the length of the messages.")
    with pytest.raises(openai.BadRequestError) as completion:
        client.completions.create(model=LARGE, prompt=text)
    assert (completion.value.code, completion.value.param) == ("context_length_exceeded", "prompt")
    assert f"your prompt resulted in {len(tokenize(text))} tokens" in completion.value.message
    # Admitted, then refunded: no charge, and the concurrency slot is back.
    events = wait_events(gw, account_id, 2)
    assert [(e["status"], e["cost_pico"]) for e in events] == [("refunded", 0), ("refunded", 0)]
    assert bars(gw, key) == (500, "$24.00")
    assert client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}]).choices


def test_suspended_account_is_permission_denied(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    assert client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}]).choices
    assert gw.admin.post(f"/admin/v1/accounts/{account_id}/suspend").status_code == 200
    assert gw.runtime is not None
    gw.runtime.accounts.forget_cached()
    with pytest.raises(openai.PermissionDeniedError) as err:
        client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}])
    assert err.value.status_code == 403
    assert gw.admin.post(f"/admin/v1/accounts/{account_id}/resume").status_code == 200
    gw.runtime.accounts.forget_cached()
    assert client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}]).choices


def test_held_slot_gives_rate_limit_error_with_retry_after(redis_server: RedisServer, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, queue_timeout_s=0, tokens_per_s=40) as g:
        account_id, key = g.new_key(["standard"])
        client = client_for(g, key)
        user: Any = [{"role": "user", "content": f"{unique('hold')} tell me a story"}]
        stream = client.chat.completions.create(model=LARGE, messages=user, stream=True)
        held = iter(stream)
        assert next(held).choices[0].delta.role == "assistant"
        with pytest.raises(openai.RateLimitError) as err:
            client.chat.completions.create(model=LARGE, messages=user)
        assert err.value.status_code == 429 and err.value.code == "concurrency_limit"
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 30
        # Another model is another slot; a refused request charged nothing.
        assert client.chat.completions.create(model=SMALL, messages=user, max_tokens=2).choices
        remaining = g.quotas(key)["rollingFiveHourLimit"]["remaining"]
        assert remaining == pytest.approx(499 - 2.0 / 3.4, abs=1e-4)
        # Draining the held stream frees the slot.
        text = "".join(c.choices[0].delta.content or "" for c in held if c.choices)
        assert text
        stream.close()
        assert client.chat.completions.create(model=LARGE, messages=user, max_tokens=2).choices
        events = wait_events(g, account_id, 3)
        assert sorted(e["model"] for e in events) == [LARGE, LARGE, SMALL]
        assert all(e["cost_pico"] > 0 for e in events)


# -- async ----------------------------------------------------------------------------------------

async def test_async_chat_stream_completions_and_embeddings(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    async with async_client_for(gw, key) as client:
        question = f"{unique('async')} stream please"
        stream = await client.chat.completions.create(
            model=LARGE, messages=[{"role": "user", "content": question}], stream=True,
            stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        usage = chunks[-1].usage
        assert usage is not None and usage.completion_tokens == len(tokenize(text)) > 0
        assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == 0
        resp = await client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": question}])
        assert resp.choices[0].message.content
        emb = await client.embeddings.create(model=EMBED, input=["a", "b", "c"], encoding_format="float")
        assert [len(d.embedding) for d in emb.data] == [64, 64, 64]
        async with client.chat.completions.stream(
                model=LARGE, messages=[{"role": "user", "content": question}]) as s:
            final = await s.get_final_completion()
        assert final.choices[0].message.content == text  # deterministic for the same prompt
    events = wait_events(gw, account_id, 4)
    assert [e["model"] for e in events].count(LARGE) == 2
    assert_billed(events[0], LARGE, usage.prompt_tokens, 0, usage.completion_tokens)
    assert [e["cost_pico"] > 0 for e in events] == [True, True, False, True]
