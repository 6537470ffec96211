"""The gateway driven only through the official `anthropic` SDK (sync and async, streaming and not).

One live gateway (uvicorn, simulated engine, the session Redis) serves the
whole module; every test makes its own account. Token counts, cache reads and
costs are asserted exactly against the deterministic simulated engine.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
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
    LARGE,
    SMALL,
    cost_pico,
    expected_cached,
    long_text,
    prompt_tokens,
    unique,
    wait_events,
)

WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city"],
    },
}


# -- fixtures and helpers ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-anthropic"),
                     queue_timeout_s=5) as g:
        yield g


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK reads these from the environment; only what a test passes may be sent."""
    for name in ("ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN", "ANTHROPIC_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def account(gw: LiveGateway) -> tuple[str, str]:
    return gw.new_key(["standard"])


def client_for(gw: LiveGateway, key: str, prefix: str = "/anthropic", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"{gw.base_url}{prefix}", api_key=key, max_retries=0, timeout=30, **kw)


def assert_billed(event: dict[str, Any], model: str, usage: Any) -> None:
    """The usage event matches what the client was told, in Anthropic's split."""
    prompt = usage.input_tokens + usage.cache_read_input_tokens
    assert event["model"] == model and event["status"] == "ok"
    assert (event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"]) == (
        prompt, usage.cache_read_input_tokens, usage.output_tokens)
    assert event["cost_pico"] == cost_pico(model, prompt, usage.cache_read_input_tokens, usage.output_tokens) > 0


def bars(gw: LiveGateway, key: str) -> tuple[Any, str]:
    q = gw.quotas(key)
    return q["rollingFiveHourLimit"]["remaining"], q["weeklyTokenLimit"]["remainingCredits"]


def reads(usage: Any) -> int:
    """`cache_read_input_tokens`, which must be present (0 included), not left out."""
    assert usage.cache_read_input_tokens is not None, usage
    return int(usage.cache_read_input_tokens)


def body_of(err: Any) -> dict[str, Any]:
    assert isinstance(err.body, dict), err.body
    return err.body


def text_of(message: Any) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


# -- messages ----------------------------------------------------------------------------------

def test_message_non_stream_usage_and_billing(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('fresh')} explain the cache"
    msg = client_for(gw, key).messages.create(model=LARGE, max_tokens=200, system="You are terse.",
                                              messages=[{"role": "user", "content": question}])
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant" and msg.model == LARGE
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    [block] = msg.content
    assert block.type == "text" and block.text
    expected = len(prompt_tokens([ChatMessage("system", "You are terse."), ChatMessage("user", question)]))
    assert (msg.usage.input_tokens, msg.usage.cache_read_input_tokens) == (expected, 0)
    assert msg.usage.output_tokens == len(tokenize(block.text))
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, msg.usage)


def test_system_as_blocks_equals_system_as_string(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    client = client_for(gw, key)
    tag = unique("sys")
    user: Any = [{"role": "user", "content": [{"type": "text", "text": "say something"}]}]
    as_blocks = client.messages.create(
        model=SMALL, max_tokens=100, messages=user,
        system=[{"type": "text", "text": f"{tag} rule one"}, {"type": "text", "text": "rule two"}])
    as_string = client.messages.create(model=SMALL, max_tokens=100, messages=user, system=f"{tag} rule one\nrule two")
    assert text_of(as_blocks) == text_of(as_string) != ""  # the same prompt, so the same deterministic answer
    total = [m.usage.input_tokens + reads(m.usage) for m in (as_blocks, as_string)]
    assert total[0] == total[1]
    assert reads(as_blocks.usage) == 0 and reads(as_string.usage) > 0


def test_stream_helper_final_message_and_billing(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('helper')} stream it"
    with client_for(gw, key).messages.stream(model=LARGE, max_tokens=200,
                                             messages=[{"role": "user", "content": question}]) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text_of(final) != ""
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == len(prompt_tokens([ChatMessage("user", question)]))
    assert final.usage.cache_read_input_tokens == 0
    assert final.usage.output_tokens == len(tokenize(streamed))
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, final.usage)  # no "$0 for streams"


def compress(types: Sequence[str]) -> list[str]:
    out: list[str] = []
    for t in types:
        if not (out and out[-1] == t == "content_block_delta"):
            out.append(t)
    return out


def test_raw_stream_event_order(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('raw')} events please"
    events: list[Any] = list(client_for(gw, key).messages.create(model=LARGE, max_tokens=200, stream=True,
                                                       messages=[{"role": "user", "content": question}]))
    types = [e.type for e in events]
    assert compress(types) == ["message_start", "content_block_start", "content_block_delta", "content_block_stop",
                               "message_delta", "message_stop"]
    assert types.count("content_block_delta") >= 2
    start, delta = events[0], events[-2]
    assert start.type == "message_start" and delta.type == "message_delta"
    assert start.message.content == [] and start.message.stop_reason is None
    prompt = len(prompt_tokens([ChatMessage("user", question)]))
    assert (start.message.usage.input_tokens, start.message.usage.cache_read_input_tokens) == (prompt, 0)
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert delta.delta.stop_reason == "end_turn"
    assert delta.usage.output_tokens == len(tokenize(text)) > 0
    assert {e.index for e in events if e.type.startswith("content_block")} == {0}
    [event] = wait_events(gw, account_id, 1)
    assert event["completion_tokens"] == delta.usage.output_tokens and event["cost_pico"] > 0


def test_thinking_block_for_a_think_prompt(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    client = client_for(gw, key)
    user: Any = [{"role": "user", "content": f"{unique('t')} think it through"}]
    msg = client.messages.create(model=LARGE, max_tokens=200, messages=user)
    assert [b.type for b in msg.content] == ["thinking", "text"]
    thinking = msg.content[0]
    assert thinking.type == "thinking" and thinking.thinking
    with client.messages.stream(model=LARGE, max_tokens=200, messages=user) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].type == "thinking" and final.content[0].thinking == thinking.thinking
    assert text_of(final) == text_of(msg)
    assert final.usage.output_tokens == msg.usage.output_tokens == \
        len(tokenize(thinking.thinking)) + len(tokenize(text_of(msg)))
    # Agents send the thinking block back with the next turn.
    turns: list[Any] = [*user, {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in msg.content]},
                        {"role": "user", "content": "and then?"}]
    follow = client.messages.create(model=LARGE, max_tokens=200, messages=turns)
    assert follow.stop_reason == "end_turn" and text_of(follow)


def test_stop_sequences(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    user: Any = [{"role": "user", "content": f"{unique('stop')} talk"}]
    full = text_of(client.messages.create(model=SMALL, max_tokens=200, messages=user))
    stop = full.split()[2]
    stopped = client.messages.create(model=SMALL, max_tokens=200, messages=user, stop_sequences=[stop, "zzz-never"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert text_of(stopped) == full[:full.find(stop)]
    with client.messages.stream(model=SMALL, max_tokens=200, messages=user, stop_sequences=[stop]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop and text_of(final) == text_of(stopped)
    capped = client.messages.create(model=SMALL, max_tokens=2, messages=user)
    assert capped.stop_reason == "max_tokens" and capped.usage.output_tokens == 2
    wait_events(gw, account_id, 4)


# -- tools ---------------------------------------------------------------------------------------

def test_tool_use_round_trip(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    messages: list[Any] = [{"role": "user", "content": f"What is the weather in {unique('Rome')}?"}]
    first = client.messages.create(model=LARGE, max_tokens=200, messages=messages, tools=[WEATHER_TOOL])
    assert first.stop_reason == "tool_use"
    [use] = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("call_")
    assert isinstance(use.input, dict) and set(use.input) == {"city", "unit"} and use.input["unit"] == "celsius"
    messages.append({"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]})
    messages.append({"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                  "content": [{"type": "text", "text": "21C and clear"}]}]})
    # tool_choice stays "auto": a tool result is answered in words, not with another call.
    second = client.messages.create(model=LARGE, max_tokens=200, messages=messages, tools=[WEATHER_TOOL])
    assert second.stop_reason == "end_turn" and [b.type for b in second.content] == ["text"] and text_of(second)
    # The whole first prompt comes from the cache.
    first_prompt = first.usage.input_tokens + reads(first.usage)
    assert second.usage.cache_read_input_tokens == first_prompt // BLOCK * BLOCK
    # Streaming tool use: the SDK accumulates input_json_delta into a parsed input.
    with client.messages.stream(model=LARGE, max_tokens=200, messages=messages[:1], tools=[WEATHER_TOOL]) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    [streamed] = [b for b in final.content if b.type == "tool_use"]
    assert streamed.name == "get_weather" and streamed.input == use.input
    # Forced tool choice.
    forced = client.messages.create(model=LARGE, max_tokens=200, tools=[WEATHER_TOOL],
                                    tool_choice={"type": "tool", "name": "get_weather"},
                                    messages=[{"role": "user", "content": "hello"}])
    assert [b.type for b in forced.content] == ["tool_use"] and forced.stop_reason == "tool_use"
    events = wait_events(gw, account_id, 4)
    assert all(e["cost_pico"] > 0 for e in events)


# -- count_tokens and cache reads -------------------------------------------------------------------

def test_count_tokens_is_free_and_matches_openai(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    system, question = "Be brief.", f"{unique('count')} how many tokens is this?"
    counted = client.messages.count_tokens(model=LARGE, system=system,
                                           messages=[{"role": "user", "content": question}])
    assert counted.input_tokens == len(prompt_tokens([ChatMessage("system", system), ChatMessage("user", question)]))
    with_tools = client.messages.count_tokens(model=LARGE, messages=[{"role": "user", "content": question}],
                                              tools=[WEATHER_TOOL])
    assert with_tools.input_tokens > counted.input_tokens
    for _ in range(3):
        client.messages.count_tokens(model=LARGE, messages=[{"role": "user", "content": question}])
    assert bars(gw, key) == (500, "$24.00")
    assert gw.usage_events(account_id) == []
    oai = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    chat = oai.chat.completions.create(model=LARGE, messages=[{"role": "system", "content": system},
                                                               {"role": "user", "content": question}])
    assert chat.usage is not None and chat.usage.prompt_tokens == counted.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        client.messages.count_tokens(model="hf:no/such", messages=[{"role": "user", "content": "x"}])


def test_cache_read_on_a_repeated_long_prefix(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    system = long_text(320, unique("doc"))
    asks = ["summarise it", "now list the key terms"]
    msgs = [client.messages.create(model=LARGE, max_tokens=8, system=system,
                                   messages=[{"role": "user", "content": a}]) for a in asks]
    toks = [prompt_tokens([ChatMessage("system", system), ChatMessage("user", a)]) for a in asks]
    fresh, repeat = (m.usage for m in msgs)
    assert (fresh.input_tokens, fresh.cache_read_input_tokens) == (len(toks[0]), 0)
    cached = expected_cached(toks[0], toks[1])
    assert cached >= 320
    assert (repeat.input_tokens, repeat.cache_read_input_tokens) == (len(toks[1]) - cached, cached)
    # The same conversation through the OpenAI API: prompt_tokens = uncached input + cache reads.
    oai = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0)
    chat = oai.chat.completions.create(model=LARGE, max_tokens=8, messages=[
        {"role": "system", "content": system}, {"role": "user", "content": asks[1]}])
    assert chat.usage is not None and chat.usage.prompt_tokens_details is not None
    assert chat.usage.prompt_tokens == repeat.input_tokens + reads(repeat)
    # An identical prompt: every whole block but the one holding the last token is a hit.
    assert chat.usage.prompt_tokens_details.cached_tokens == (len(toks[1]) - 1) // BLOCK * BLOCK
    first, second, _ = wait_events(gw, account_id, 3)
    assert_billed(first, LARGE, fresh)
    assert_billed(second, LARGE, repeat)


# -- auth, versions, base URLs ------------------------------------------------------------------------

def test_auth_by_x_api_key_and_by_bearer(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    user: Any = [{"role": "user", "content": "hi"}]
    by_api_key = client_for(gw, key)
    assert by_api_key.messages.create(model=SMALL, max_tokens=5, messages=user).content
    by_bearer = anthropic.Anthropic(base_url=f"{gw.base_url}/anthropic", auth_token=key, max_retries=0)
    raw = by_bearer.messages.with_raw_response.create(model=SMALL, max_tokens=5, messages=user)
    assert raw.http_request.headers["authorization"] == f"Bearer {key}"
    assert "x-api-key" not in raw.http_request.headers
    assert raw.parse().content
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=f"{gw.base_url}/anthropic", auth_token="ps-wrong", max_retries=0
                            ).messages.create(model=SMALL, max_tokens=5, messages=user)
    wait_events(gw, account_id, 2)


def test_anthropic_version_and_both_base_urls(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    user: Any = [{"role": "user", "content": "hi"}]
    for prefix in ("/anthropic", ""):  # the SDK appends /v1/messages
        client = client_for(gw, key, prefix, default_headers={"anthropic-version": "2023-06-01"})
        raw = client.messages.with_raw_response.create(model=SMALL, max_tokens=5, messages=user)
        assert raw.http_request.headers["anthropic-version"] == "2023-06-01"
        assert raw.http_request.url.path == ("/anthropic/v1/messages" if prefix else "/v1/messages")
        assert raw.parse().content
        assert "x-ratelimit-remaining-requests" in raw.headers
        assert "x-packserve-weekly-remaining-usd" in raw.headers
        assert client.messages.count_tokens(model=SMALL, messages=user).input_tokens > 0
        with pytest.raises(anthropic.NotFoundError):
            client.messages.create(model="hf:nope/nope", max_tokens=5, messages=user)
    # An unusual version string is accepted too (packserve speaks one dialect).
    odd = client_for(gw, key, default_headers={"anthropic-version": "2099-01-01"})
    assert odd.messages.create(model=SMALL, max_tokens=5, messages=user).content
    wait_events(gw, account_id, 3)


def test_quota_headers_decrease(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    user: Any = [{"role": "user", "content": f"{unique('h')} hi"}]
    first = client.messages.with_raw_response.create(model=LARGE, max_tokens=20, messages=user)
    assert first.headers["x-ratelimit-remaining-requests"] == "499"
    assert first.headers["x-packserve-weekly-remaining-usd"] == "24.000000"
    [event] = wait_events(gw, account_id, 1)
    with client.messages.with_streaming_response.create(model=LARGE, max_tokens=20, messages=user,
                                                        stream=True) as second:
        assert second.headers["x-ratelimit-remaining-requests"] == "498"
        assert second.headers["x-packserve-weekly-remaining-usd"] == \
            f"{(24 * 10**12 - event['cost_pico']) / 10**12:.6f}"
        assert "event: message_stop" in second.read().decode()


# -- typed errors --------------------------------------------------------------------------------------

def test_typed_errors(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    user: Any = [{"role": "user", "content": "hi"}]
    with pytest.raises(anthropic.AuthenticationError) as auth:
        client_for(gw, "ps-bogus").messages.create(model=LARGE, max_tokens=5, messages=user)
    assert auth.value.status_code == 401
    assert body_of(auth.value)["type"] == "error" and body_of(auth.value)["error"]["type"] == "authentication_error"
    client = client_for(gw, key)
    for model in ("hf:no/such-model", "hf:packserve/Sim-Large"):
        with pytest.raises(anthropic.NotFoundError) as nf:
            client.messages.create(model=model, max_tokens=5, messages=user)
        assert nf.value.status_code == 404 and body_of(nf.value)["error"]["type"] == "not_found_error"
        assert model in nf.value.message and "GET /v1/models" in nf.value.message
    bad_calls: list[dict[str, Any]] = [
        {"model": LARGE, "max_tokens": 0, "messages": user},
        {"model": LARGE, "max_tokens": 5, "messages": []},
        {"model": LARGE, "max_tokens": 5, "messages": user, "extra_body": {"temperature": 7}},
        {"model": "hf:packserve/sim-embed", "max_tokens": 5, "messages": user},
        {"model": LARGE, "max_tokens": 5, "messages": user, "tools": [WEATHER_TOOL],
         "tool_choice": {"type": "tool", "name": "not_a_tool"}},
        # Structured outputs on a model that cannot constrain its output: refused, not ignored.
        {"model": LARGE, "max_tokens": 5, "messages": user,
         "output_config": {"format": {"type": "json_schema", "schema": {"type": "object"}}}},
    ]
    for kwargs in bad_calls:
        with pytest.raises(anthropic.BadRequestError) as bad:
            client.messages.create(**kwargs)
        assert bad.value.status_code == 400, kwargs
        assert body_of(bad.value)["error"]["type"] == "invalid_request_error" and body_of(bad.value)["error"]["message"]
    # max_tokens missing: past the SDK's type check, straight to the route.
    for path in ("/v1/messages", "/anthropic/v1/messages"):
        with pytest.raises(anthropic.BadRequestError) as missing:
            client_for(gw, key, "").post(path, cast_to=object,
                                         body={"model": LARGE, "messages": user})
        assert "max_tokens" in missing.value.message
    assert bars(gw, key) == (500, "$24.00")
    assert gw.usage_events(account_id) == []


def test_prompt_over_the_context_is_prompt_too_long_and_free(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    text = long_text(33_000, unique("ctx"))  # the sim models' context is 32768 tokens
    with pytest.raises(anthropic.BadRequestError) as err:
        client_for(gw, key).messages.create(model=LARGE, max_tokens=5, messages=[{"role": "user", "content": text}])
    error = body_of(err.value)["error"]
    assert error["type"] == "invalid_request_error"
    # The wording Claude-Code-style agents match to compact their history.
    tokens = len(prompt_tokens([ChatMessage("user", text)]))
    assert error["message"] == f"prompt is too long: {tokens} tokens > 32768 maximum"
    assert [e["status"] for e in wait_events(gw, account_id, 1)] == ["refunded"]
    assert bars(gw, key) == (500, "$24.00")


def test_suspended_account_is_permission_denied(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    assert gw.admin.post(f"/admin/v1/accounts/{account_id}/suspend").status_code == 200
    assert gw.runtime is not None
    gw.runtime.accounts.forget_cached()
    with pytest.raises(anthropic.PermissionDeniedError) as err:
        client_for(gw, key).messages.create(model=SMALL, max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert body_of(err.value)["error"]["type"] == "permission_error"


def test_held_slot_gives_rate_limit_error_with_retry_after(redis_server: RedisServer, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, queue_timeout_s=0, tokens_per_s=40) as g:
        account_id, key = g.new_key(["standard"])
        client = client_for(g, key)
        user: Any = [{"role": "user", "content": f"{unique('hold')} a long story"}]
        with client.messages.stream(model=LARGE, max_tokens=200, messages=user) as held:
            first = next(iter(held))
            assert first.type == "message_start"
            with pytest.raises(anthropic.RateLimitError) as err:
                client.messages.create(model=LARGE, max_tokens=5, messages=user)
            assert err.value.status_code == 429
            assert body_of(err.value)["error"]["type"] == "rate_limit_error"
            assert "concurrent" in err.value.message
            assert 1 <= int(err.value.response.headers["retry-after"]) <= 30
            final = held.get_final_message()
        assert final.stop_reason == "end_turn"
        assert client.messages.create(model=LARGE, max_tokens=5, messages=user).content
        events = wait_events(g, account_id, 2)
        assert all(e["status"] == "ok" and e["cost_pico"] > 0 for e in events)
        assert g.quotas(key)["rollingFiveHourLimit"]["remaining"] == 498  # the refusal cost nothing


# -- async ------------------------------------------------------------------------------------------

async def test_async_messages_stream_and_create(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('async')} stream please"
    async with anthropic.AsyncAnthropic(base_url=f"{gw.base_url}/anthropic", api_key=key, max_retries=0) as client:
        async with client.messages.stream(model=LARGE, max_tokens=200,
                                          messages=[{"role": "user", "content": question}]) as stream:
            streamed = "".join([t async for t in stream.text_stream])
            final = await stream.get_final_message()
        assert streamed == text_of(final) != ""
        raw_events = [e.type async for e in await client.messages.create(
            model=LARGE, max_tokens=200, stream=True, messages=[{"role": "user", "content": question}])]
        assert compress(raw_events) == ["message_start", "content_block_start", "content_block_delta",
                                        "content_block_stop", "message_delta", "message_stop"]
        again = await client.messages.create(model=LARGE, max_tokens=200,
                                             messages=[{"role": "user", "content": question}])
        assert text_of(again) == streamed  # deterministic for the same prompt
        assert reads(again.usage) > 0
        counted = await client.messages.count_tokens(model=LARGE, messages=[{"role": "user", "content": question}])
        assert counted.input_tokens == again.usage.input_tokens + reads(again.usage)
    events = wait_events(gw, account_id, 3)
    assert_billed(events[0], LARGE, final.usage)
    assert_billed(events[2], LARGE, again.usage)
    assert all(e["cost_pico"] > 0 for e in events)


# -- what coding agents send ------------------------------------------------------------------

def test_mid_conversation_system_message_is_accepted_and_counted_alike(gw: LiveGateway,
                                                                      account: tuple[str, str]) -> None:
    """Claude Code's first request ends in a `system` message; it is folded into the user turn."""
    _, key = account
    client = client_for(gw, key)
    messages: Any = [{"role": "user", "content": [{"type": "text", "text": "Say hello"}]},
                     {"role": "system", "content": "Available agent types for the Agent tool: general-purpose"}]
    counted = client.messages.count_tokens(model=LARGE, messages=messages)
    with client.messages.stream(model=LARGE, max_tokens=64, messages=messages,
                                extra_headers={"anthropic-beta": "mid-conversation-system-2026-04-07"},
                                extra_query={"beta": "true"}) as stream:
        final = stream.get_final_message()
    assert final.stop_reason in ("end_turn", "max_tokens") and text_of(final)
    assert final.usage.input_tokens + reads(final.usage) == counted.input_tokens
    folded = [ChatMessage("user", "Say hello\n<system-reminder>\nAvailable agent types for the Agent tool: "
                                  "general-purpose\n</system-reminder>")]
    assert counted.input_tokens == len(prompt_tokens(folded))


def test_base_urls_answer_head_and_get(gw: LiveGateway) -> None:
    for path in ("/anthropic", "/anthropic/v1", "/v1", "/openai/v1"):
        assert httpx.head(f"{gw.base_url}{path}", timeout=10).status_code == 200, path
        got = httpx.get(f"{gw.base_url}{path}", timeout=10)
        assert got.status_code == 200 and got.json()["base_url"] == path


def test_messages_directly_under_anthropic_for_ai_sdk_clients(gw: LiveGateway, account: tuple[str, str]) -> None:
    """AI-SDK clients (opencode's Anthropic provider) append /messages to the base URL `.../anthropic`."""
    account_id, key = account
    client = client_for(gw, key, "")
    msg: Any = client.post("/anthropic/messages", cast_to=object, body={
        "model": SMALL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]})
    assert msg["type"] == "message" and msg["usage"]["output_tokens"] > 0
    counted: Any = client.post("/anthropic/messages/count_tokens", cast_to=object, body={
        "model": SMALL, "messages": [{"role": "user", "content": "hi"}]})
    assert counted["input_tokens"] == msg["usage"]["input_tokens"] + msg["usage"]["cache_read_input_tokens"]
    assert len(wait_events(gw, account_id, 1)) == 1


def test_rejected_requests_are_logged_and_counted_by_route_and_code(gw: LiveGateway,
                                                                    account: tuple[str, str]) -> None:
    account_id, key = account
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.WARNING)
    logger = logging.getLogger("packserve.gateway")
    logger.addHandler(handler)
    try:
        secret_prompt = unique("do-not-log")
        turns = [{"role": "tool", "content": secret_prompt}]
        bad = httpx.post(f"{gw.base_url}/anthropic/v1/messages", headers={"x-api-key": key}, timeout=10,
                         json={"model": LARGE, "max_tokens": 5, "messages": turns})
        assert bad.status_code == 400
        assert bad.json()["error"] == {"type": "invalid_request_error",
                                       "message": "messages.0.role: Input should be 'user', 'assistant' or 'system'"}
        missing = httpx.get(f"{gw.base_url}/anthropic/nowhere", timeout=10)
        assert missing.status_code == 404
    finally:
        logger.removeHandler(handler)
    rejected = [r.__dict__ for r in records if r.getMessage() == "request rejected"]
    assert [(r["route"], r["status"], r["code"], r["account"]) for r in rejected] == [
        ("/anthropic/v1/messages", 400, "invalid_request", account_id), ("unmatched", 404, "not_found", None)]
    assert all(secret_prompt not in str(r) for r in rejected)
    metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    assert 'packserve_client_errors_total{code="invalid_request",route="/anthropic/v1/messages",status="400"}' \
        in metrics
    assert 'packserve_client_errors_total{code="not_found",route="unmatched",status="404"}' in metrics
