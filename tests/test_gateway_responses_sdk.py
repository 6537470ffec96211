"""The Responses API driven only through the official `openai` SDK, on a live gateway (simulated engine).

Token counts and costs are asserted exactly: the simulated engine is
deterministic, and a Responses request reaches it as the same chat turns a
chat completion would (instructions as the system message, items as turns).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai.types.responses import ResponseFunctionToolCall

from serve_apps.engines.sim import FAIL_BEFORE_FIRST_TOKEN, FAIL_MID_STREAM, FAIL_MID_STREAM_AFTER, tokenize
from serve_apps.engines.types import ChatMessage
from tests.conftest import RedisServer
from tests.live_gateway import LiveGateway
from tests.sim_expect import BLOCK, EMBED, LARGE, SMALL, cost_pico, prompt_tokens, unique, wait_events

WEATHER: Any = {"type": "function", "name": "get_weather", "description": "Current weather for a city", "strict": True,
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"type": "string", "enum": ["celsius"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def gw(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path_factory.mktemp("gw-responses"),
                     queue_timeout_s=5) as g:
        yield g


@pytest.fixture
def account(gw: LiveGateway) -> tuple[str, str]:
    return gw.new_key(["standard"])


def client_for(gw: LiveGateway, key: str, prefix: str = "/v1") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}{prefix}", api_key=key, max_retries=0, timeout=30)


def bars(gw: LiveGateway, key: str) -> tuple[Any, str]:
    q = gw.quotas(key)
    return q["rollingFiveHourLimit"]["remaining"], q["weeklyTokenLimit"]["remainingCredits"]


def assert_billed(event: dict[str, Any], model: str, prompt: int, cached: int, completion: int) -> None:
    assert (event["model"], event["status"], event["api"]) == (model, "ok", "responses")
    assert (event["prompt_tokens"], event["cached_tokens"], event["completion_tokens"]) == (prompt, cached, completion)
    assert event["cost_pico"] == cost_pico(model, prompt, cached, completion)


# -- create ----------------------------------------------------------------------------------------

def test_string_input_with_instructions_is_billed_like_chat(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    question = f"{unique('q')} what does the cache do?"
    resp = client_for(gw, key, "/openai/v1").responses.create(model=LARGE, input=question,
                                                              instructions="Answer briefly.")
    expected = prompt_tokens([ChatMessage("system", "Answer briefly."), ChatMessage("user", question)])
    assert resp.id.startswith("resp_") and resp.object == "response" and resp.status == "completed"
    assert resp.model == LARGE and resp.instructions == "Answer briefly." and resp.to_dict()["store"] is False
    assert resp.output_text and [o.type for o in resp.output] == ["message"]
    usage = resp.usage
    assert usage is not None and usage.input_tokens == len(expected)
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens == len(tokenize(resp.output_text)) and usage.output_tokens_details.reasoning_tokens == 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, usage.input_tokens, 0, usage.output_tokens)


def test_item_input_and_a_reasoning_model(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    items: Any = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "You are terse."}]},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": f"{unique('a')} hello"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hi.",
                                                               "annotations": []}]},
        {"role": "user", "content": "now think about step two"},
    ]
    resp = client.responses.create(model=LARGE, input=items, max_output_tokens=40)
    assert [o.type for o in resp.output] == ["reasoning", "message"]
    reasoning = resp.output[0]
    assert reasoning.type == "reasoning" and reasoning.summary and reasoning.summary[0].text
    usage = resp.usage
    assert usage is not None
    words = len(tokenize(reasoning.summary[0].text))
    assert usage.output_tokens_details.reasoning_tokens == words
    assert usage.output_tokens == words + len(tokenize(resp.output_text))
    expected = prompt_tokens([ChatMessage("system", "You are terse."), ChatMessage("user", items[1]["content"][0]
                                                                                   ["text"]),
                              ChatMessage("assistant", "Hi."), ChatMessage("user", "now think about step two")])
    assert usage.input_tokens == len(expected)
    # A small output budget: the response says it is incomplete, and why.
    short = client.responses.create(model=SMALL, input=f"{unique('b')} hello", max_output_tokens=2)
    assert short.status == "incomplete" and short.incomplete_details is not None
    assert short.incomplete_details.reason == "max_output_tokens"
    assert short.usage is not None and short.usage.output_tokens == 2
    # Streamed, it ends as OpenAI ends it: `response.incomplete` (the SDK's helper then has no final response).
    streamed = list(client.responses.create(model=SMALL, input=f"{unique('b')} hello", max_output_tokens=2,
                                            stream=True))
    last = streamed[-1]
    assert last.type == "response.incomplete" and last.response.status == "incomplete"
    events = wait_events(gw, account_id, 3)
    assert [e["api"] for e in events] == ["responses"] * 3


# -- streaming ------------------------------------------------------------------------------------

def test_raw_stream_events_and_billing(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    stream = client_for(gw, key).responses.create(model=LARGE, input=f"{unique('s')} stream it", stream=True)
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert len(deltas) > 1
    done = events[-1]
    assert done.type == "response.completed"
    final = done.response
    assert final.output_text == "".join(deltas) and final.status == "completed"
    assert final.usage is not None and final.usage.output_tokens == len(tokenize(final.output_text))
    [event] = wait_events(gw, account_id, 1)
    assert_billed(event, LARGE, final.usage.input_tokens, 0, final.usage.output_tokens)


def test_stream_helper_final_response(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    client = client_for(gw, key)
    question = f"{unique('h')} explain the loop"
    text: list[str] = []
    with client.responses.stream(model=SMALL, input=question, instructions="Be kind.") as stream:
        for event in stream:
            if event.type == "response.output_text.delta":
                text.append(event.delta)
        final = stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(text) != ""
    # Deterministic: the non-streamed answer to the same request is the same text.
    again = client.responses.create(model=SMALL, input=question, instructions="Be kind.")
    assert again.output_text == final.output_text


# -- tools ---------------------------------------------------------------------------------------

def test_function_call_round_trip(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    history: list[Any] = [{"role": "user", "content": f"What is the weather in {unique('Paris')}?"}]
    first = client.responses.create(model=LARGE, input=history, tools=[WEATHER])
    [call] = first.output
    assert isinstance(call, ResponseFunctionToolCall) and call.type == "function_call"
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.id and call.status == "completed"
    args = json.loads(call.arguments)
    assert set(args) == {"city", "unit"} and args["unit"] == "celsius"
    assert first.tools and first.tools[0].type == "function" and first.tools[0].name == "get_weather"
    assert first.usage is not None and first.usage.output_tokens == len(tokenize("get_weather " + call.arguments))
    history += [call.model_dump(exclude_none=True),
                {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp_c": 21}'}]
    second = client.responses.create(model=LARGE, input=history, tools=[WEATHER])
    assert [o.type for o in second.output] == ["message"] and second.output_text
    # The first turn, tools and all, is read back from the prefix cache.
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens == first.usage.input_tokens // BLOCK * BLOCK
    # Streamed: the call arrives as argument deltas and a done item; the helper assembles it.
    with client.responses.stream(model=LARGE, input=history[:1], tools=[WEATHER]) as s:
        seen = [e.type for e in s]
        final = s.get_final_response()
    assert "response.function_call_arguments.delta" in seen and "response.function_call_arguments.done" in seen
    [streamed] = final.output
    assert streamed.type == "function_call" and json.loads(streamed.arguments)["unit"] == "celsius"
    events = wait_events(gw, account_id, 3)
    assert all(e["cost_pico"] > 0 and e["api"] == "responses" for e in events)


def test_codex_shaped_request_with_namespace_and_web_search(gw: LiveGateway, account: tuple[str, str]) -> None:
    """What Codex CLI sends: ids on every item, a developer prompt, namespace and web_search tools, no instructions."""
    _, key = account
    client = client_for(gw, key)
    agents = {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents.",
              "tools": [{"type": "function", "name": "spawn_agent", "description": "Start a sub-agent.",
                         "strict": False, "parameters": {"type": "object", "properties": {
                             "task": {"type": "string"}}, "required": ["task"], "additionalProperties": False}}]}
    body: dict[str, Any] = {
        "model": LARGE, "tool_choice": "auto", "parallel_tool_calls": True,
        "reasoning": {"summary": "auto"}, "store": False, "include": ["reasoning.encrypted_content"],
        "prompt_cache_key": unique("session"), "tools": [WEATHER, agents, {"type": "web_search",
                                                                          "external_web_access": False}],
        "input": [
            {"type": "message", "id": "msg_1", "role": "developer", "content": [{"type": "input_text",
                                                                                  "text": "You are Codex."}]},
            {"type": "message", "id": "msg_2", "role": "user",
             "content": [{"type": "input_text", "text": f"{unique('c')} start one\n"
                                                        '@sim-call multi_agent_v1.spawn_agent {"task": "lint"}'}]},
        ],
    }
    with client.responses.stream(**body, extra_body={"client_metadata": {"x-codex-window-id": "w:0"}}) as s:
        final = s.get_final_response()
    [call] = final.output
    assert call.type == "function_call"
    assert (call.name, call.namespace, json.loads(call.arguments)) == ("spawn_agent", "multi_agent_v1",
                                                                       {"task": "lint"})
    assert [t.type for t in final.tools] == ["function", "namespace"]  # web_search was not offered
    # The next turn sends the call, a reasoning item and the output back, with ids, as Codex does.
    body["input"] += [
        {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": None},
        {"type": "function_call", "id": call.id, "call_id": call.call_id, "name": call.name,
         "namespace": call.namespace, "arguments": call.arguments, "status": "completed"},
        {"type": "function_call_output", "id": "fco_1", "call_id": call.call_id, "output": "agent started"},
    ]
    with client.responses.stream(**body) as s:
        answer = s.get_final_response()
    assert [o.type for o in answer.output] == ["message"] and answer.output_text
    assert answer.usage is not None and answer.usage.input_tokens_details.cached_tokens > 0


# -- errors ----------------------------------------------------------------------------------------

def test_bad_key_is_authentication_error(gw: LiveGateway) -> None:
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(gw, "ps-not-a-real-key").responses.create(model=LARGE, input="hi")
    assert err.value.status_code == 401 and err.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client_for(gw, "ps-not-a-real-key").responses.create(model=LARGE, input="hi", stream=True)


def test_unknown_model_is_not_found(gw: LiveGateway, account: tuple[str, str]) -> None:
    _, key = account
    with pytest.raises(openai.NotFoundError) as err:
        client_for(gw, key).responses.create(model="hf:packserve/SIM-LARGE", input="hi")
    assert err.value.code == "model_not_found" and "hf:packserve/SIM-LARGE" in err.value.message
    with pytest.raises(openai.BadRequestError) as wrong_kind:
        client_for(gw, key).responses.create(model=EMBED, input="hi")
    assert wrong_kind.value.param == "model"
    assert bars(gw, key) == (500, "$24.00")


def test_no_response_can_be_fetched_by_id(gw: LiveGateway, account: tuple[str, str]) -> None:
    """Nothing is stored (SPEC §3), so there is no GET /responses/{id}: a 404 in OpenAI's shape."""
    _, key = account
    client = client_for(gw, key)
    created = client.responses.create(model=SMALL, input=f"{unique('g')} hi")
    with pytest.raises(openai.NotFoundError) as err:
        client.responses.retrieve(created.id)
    assert err.value.status_code == 404 and err.value.message


@pytest.mark.parametrize("case", ["previous_response_id", "image", "custom_tool", "item_reference", "logprobs",
                                  "json_schema_unsupported", "temperature"])
def test_bad_requests_are_bad_request_errors_and_free(gw: LiveGateway, account: tuple[str, str], case: str) -> None:
    account_id, key = account
    cases: dict[str, dict[str, Any]] = {
        "previous_response_id": {"input": "and then?", "previous_response_id": "resp_abc"},
        "image": {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "data:,",
                                                          "detail": "auto"}]}]},
        "custom_tool": {"input": "hi", "tools": [{"type": "custom", "name": "apply_patch"}]},
        "item_reference": {"input": [{"type": "item_reference", "id": "msg_1"}]},
        "logprobs": {"input": "hi", "include": ["message.output_text.logprobs"]},
        "json_schema_unsupported": {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x",
                                                                       "schema": {"type": "object"}}}},
        "temperature": {"input": "hi", "temperature": 5},
    }
    kwargs = cases[case]
    with pytest.raises(openai.BadRequestError) as err:
        client_for(gw, key).responses.create(model=LARGE, **kwargs)
    assert err.value.status_code == 400 and "Traceback" not in err.value.response.text
    param = {"previous_response_id": "previous_response_id", "image": "input[0].content[0]",
             "custom_tool": "tools[0]", "item_reference": "input[0]", "logprobs": "include",
             "json_schema_unsupported": "text.format", "temperature": "temperature"}[case]
    assert err.value.param == param, err.value.body
    if case == "previous_response_id":
        assert "stores no prompts or completions" in err.value.message
    assert bars(gw, key) == (500, "$24.00")
    assert gw.usage_events(account_id) == []


def test_prompt_over_the_context_is_context_length_exceeded(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    text = " ".join(["word"] * 33_000)
    with pytest.raises(openai.BadRequestError) as err:
        client_for(gw, key).responses.create(model=LARGE, input=text, stream=True)
    assert (err.value.code, err.value.param) == ("context_length_exceeded", "input")
    [event] = wait_events(gw, account_id, 1)
    assert (event["status"], event["cost_pico"], event["api"]) == ("refunded", 0, "responses")
    assert bars(gw, key) == (500, "$24.00")


def test_held_slot_gives_rate_limit_error(redis_server: RedisServer, tmp_path: Path) -> None:
    with LiveGateway(redis_url=redis_server.url, data_dir=tmp_path, queue_timeout_s=0, tokens_per_s=40) as g:
        account_id, key = g.new_key(["standard"])
        client = client_for(g, key)
        question = f"{unique('hold')} tell me a story"
        stream = client.responses.create(model=LARGE, input=question, stream=True)
        held = iter(stream)
        assert next(held).type == "response.created"
        with pytest.raises(openai.RateLimitError) as err:
            client.responses.create(model=LARGE, input=question)
        assert err.value.status_code == 429 and err.value.code == "concurrency_limit"
        assert 1 <= int(err.value.response.headers["retry-after"]) <= 30
        assert [e.type for e in held][-1] == "response.completed"
        stream.close()
        [event] = wait_events(g, account_id, 1)
        assert event["status"] == "ok" and event["api"] == "responses"


def test_a_model_failure_is_an_http_error_before_the_stream_and_response_failed_after(
        gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    with pytest.raises(openai.InternalServerError) as before:
        client.responses.create(model=LARGE, input=f"{unique('f')} {FAIL_BEFORE_FIRST_TOKEN}", stream=True)
    assert before.value.status_code == 502
    events = list(client.responses.create(model=LARGE, input=f"{unique('f')} {FAIL_MID_STREAM}", stream=True))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    failed = events[-1]
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error is not None and failed.response.error.code == "server_error"
    assert failed.response.usage is not None and failed.response.usage.output_tokens == FAIL_MID_STREAM_AFTER
    refunded, partial = wait_events(gw, account_id, 2)
    assert (refunded["status"], refunded["cost_pico"], refunded["api"]) == ("refunded", 0, "responses")
    assert (partial["status"], partial["completion_tokens"], partial["api"]) == ("error", FAIL_MID_STREAM_AFTER,
                                                                                 "responses")
    assert partial["cost_pico"] == cost_pico(LARGE, partial["prompt_tokens"], 0, FAIL_MID_STREAM_AFTER)


# -- metering ------------------------------------------------------------------------------------

def test_a_responses_request_costs_what_the_same_chat_request_costs(redis_server: RedisServer,
                                                                   tmp_path: Path) -> None:
    """Same conversation, each on its own fresh gateway (cold prefix cache): the same bars, headers and cost."""
    instructions, question = "Answer in one line.", "what is a stamina bar?"
    with LiveGateway(redis_url=None, data_dir=tmp_path / "a") as a:
        account_a, key_a = a.new_key(["standard"])
        raw = client_for(a, key_a).responses.with_raw_response.create(model=LARGE, input=question,
                                                                      instructions=instructions)
        resp = raw.parse()
        quota_a, headers_a = a.quotas(key_a), raw.headers
        [event_a] = wait_events(a, account_a, 1)
    with LiveGateway(redis_url=None, data_dir=tmp_path / "b") as b:
        account_b, key_b = b.new_key(["standard"])
        raw_chat = client_for(b, key_b).chat.completions.with_raw_response.create(
            model=LARGE, messages=[{"role": "system", "content": instructions}, {"role": "user", "content": question}])
        chat = raw_chat.parse()
        quota_b, headers_b = b.quotas(key_b), raw_chat.headers
        [event_b] = wait_events(b, account_b, 1)
    assert chat.choices[0].message.content == resp.output_text
    assert resp.usage is not None and chat.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                    chat.usage.completion_tokens)
    assert (event_a["api"], event_b["api"]) == ("responses", "openai")
    same = ("cost_pico", "weight", "prompt_tokens", "cached_tokens", "completion_tokens", "status")
    assert {k: event_a[k] for k in same} == {k: event_b[k] for k in same}
    # Everything but the time of the next tick (each bar's clock started at its own request).
    bar_a, bar_b = quota_a["rollingFiveHourLimit"], quota_b["rollingFiveHourLimit"]
    assert {k: v for k, v in bar_a.items() if k != "nextTickAt"} == {k: v for k, v in bar_b.items()
                                                                     if k != "nextTickAt"}
    assert quota_a["weeklyTokenLimit"]["remainingCredits"] == quota_b["weeklyTokenLimit"]["remainingCredits"]
    bar_headers = [h for h in headers_b if h.startswith(("x-ratelimit", "x-packserve"))]
    assert bar_headers and {h: headers_a[h] for h in bar_headers} == {h: headers_b[h] for h in bar_headers}
    assert event_a["cost_pico"] == cost_pico(LARGE, resp.usage.input_tokens, 0, resp.usage.output_tokens)


def test_usage_report_counts_requests_per_api(gw: LiveGateway, account: tuple[str, str]) -> None:
    account_id, key = account
    client = client_for(gw, key)
    client.responses.create(model=SMALL, input=f"{unique('r')} hi")
    client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": f"{unique('c')} hi"}])
    wait_events(gw, account_id, 2)
    report = gw.admin.get(f"/admin/v1/accounts/{account_id}/usage").json()
    [row] = report["rows"]
    assert row["requests"] == 2 and row["requests_by_api"] == {"openai": 1, "responses": 1}
    # And the request counter of /metrics labels them by API too.
    metrics = httpx.get(f"{gw.base_url}/metrics", timeout=10).text
    assert f'packserve_requests_total{{model="{SMALL}",protocol="responses",status="ok"}}' in metrics
