"""The simulated engine: determinism, prefix cache, stops, limits, tools, aborts, failures."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
from typing import Any

import pytest

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.sim import (
    FAIL_BEFORE_FIRST_TOKEN,
    FAIL_MID_STREAM,
    SIM_EMBED,
    SIM_LARGE,
    SIM_SMALL,
    SimulatedEngine,
    render_chat_prompt,
    tokenize,
)
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    SamplingParams,
    ToolCall,
    ToolSpec,
)

WEATHER_TOOL = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "celsius": {"type": "boolean"},
            "lat": {"type": "number"},
            "unit": {"type": "string", "enum": ["metric", "imperial"]},
        },
        "required": ["city"],
    },
)
OTHER_TOOL = ToolSpec("read_file", "Read a file", {"type": "object", "properties": {"path": {"type": "string"}}})
SYSTEM = ChatMessage("system", "You are a careful coding assistant. " * 8)


def chat(
    text: str,
    *,
    rid: str = "r1",
    model: str = SIM_LARGE,
    max_tokens: int = 200,
    seed: int | None = None,
    stop: tuple[str, ...] = (),
    history: tuple[ChatMessage, ...] = (SYSTEM,),
    tools: tuple[ToolSpec, ...] = (),
    tool_choice: str | dict[str, str] | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=rid,
        model=model,
        sampling=SamplingParams(max_tokens=max_tokens, seed=seed, stop=stop),
        messages=(*history, ChatMessage("user", text)),
        tools=tools,
        tool_choice=tool_choice,
    )


async def run(engine: SimulatedEngine, req: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine.generate(req)]


def text_of(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


def test_satisfies_engine_protocol_and_catalog() -> None:
    engine: Engine = SimulatedEngine()
    cards = {c.id: c for c in engine.cards()}
    assert set(cards) == {SIM_LARGE, SIM_SMALL, SIM_EMBED}
    large, small, emb = cards[SIM_LARGE], cards[SIM_SMALL], cards[SIM_EMBED]
    assert (large.kind, large.size_class, large.input_price_micro, large.output_price_micro) == (
        "chat",
        "standard",
        1_200_000,
        3_400_000,
    )
    assert (small.kind, small.size_class, small.input_price_micro, small.output_price_micro) == (
        "chat",
        "small",
        300_000,
        2_000_000,
    )
    assert (emb.kind, emb.size_class, emb.input_price_micro, emb.output_price_micro) == (
        "embeddings",
        "unmetered",
        0,
        0,
    )
    assert "reasoning" in large.features and "reasoning" not in small.features
    assert large.context_length == 32768 and large.max_output_tokens == 4096


async def test_deterministic_across_instances_and_seed_changes_output() -> None:
    a = await run(SimulatedEngine(), chat("write a function"))
    b = await run(SimulatedEngine(), chat("write a function"))
    assert a == b
    assert text_of(a)
    c = await run(SimulatedEngine(), chat("write a function", seed=7))
    assert text_of(c) != text_of(a)


async def test_one_chunk_per_token_with_running_usage() -> None:
    chunks = await run(SimulatedEngine(), chat("hello"))
    body, final = chunks[:-1], chunks[-1]
    assert final.finish_reason == "stop" and final.text == ""
    assert [c.usage.completion_tokens for c in body if c.usage] == list(range(1, len(body) + 1))
    assert all(c.finish_reason is None for c in body)
    assert final.usage is not None and final.usage.completion_tokens == len(body)
    # Output re-tokenizes to the reported count: each emitted piece is one token.
    assert len(tokenize(text_of(chunks))) == final.usage.completion_tokens


async def test_prompt_tokens_match_count_tokens() -> None:
    engine = SimulatedEngine()
    req = chat("count me", tools=(WEATHER_TOOL,))
    n = await engine.count_tokens(SIM_LARGE, req.messages, None, req.tools)
    chunks = await run(engine, req)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == n
    assert n == len(tokenize(render_chat_prompt(req.messages, req.tools)))
    assert await engine.count_tokens(SIM_SMALL, (), "one two three", ()) == 3


async def test_prefix_cache_on_growing_conversation() -> None:
    engine = SimulatedEngine(block_tokens=16)
    first = await run(engine, chat("first question"))
    u1 = first[-1].usage
    assert u1 is not None and u1.cached_tokens == 0
    history = (SYSTEM, ChatMessage("user", "first question"), ChatMessage("assistant", text_of(first)))
    second = await run(engine, chat("second question", rid="r2", history=history))
    u2 = second[-1].usage
    assert u2 is not None
    assert u2.cached_tokens > 0
    assert u2.cached_tokens % 16 == 0
    assert u2.cached_tokens < u2.prompt_tokens
    # The previous prompt and its answer were cached, so nearly all of turn one is a hit.
    assert u2.cached_tokens >= (u1.prompt_tokens // 16) * 16


async def test_prefix_cache_identical_prompt_never_exceeds_prompt_tokens() -> None:
    engine = SimulatedEngine(block_tokens=4)
    req = chat("same")
    await run(engine, req)
    again = (await run(engine, chat("same", rid="r2")))[-1].usage
    assert again is not None
    assert 0 < again.cached_tokens < again.prompt_tokens
    assert again.cached_tokens % 4 == 0
    assert again.prompt_tokens - again.cached_tokens <= 4
    # With 1-token blocks every prompt is block-aligned: the last token is still recomputed.
    single = SimulatedEngine(block_tokens=1)
    await run(single, req)
    aligned = (await run(single, chat("same", rid="r3")))[-1].usage
    assert aligned is not None and aligned.cached_tokens == aligned.prompt_tokens - 1


async def test_prefix_cache_is_per_model_and_per_instance_and_bounded() -> None:
    engine = SimulatedEngine()
    await run(engine, chat("x"))
    other_model = (await run(engine, chat("x", model=SIM_SMALL)))[-1].usage
    assert other_model is not None and other_model.cached_tokens == 0
    fresh = (await run(SimulatedEngine(), chat("x")))[-1].usage
    assert fresh is not None and fresh.cached_tokens == 0
    tiny = SimulatedEngine(cache_blocks=2, block_tokens=4)
    await run(tiny, chat("x"))
    assert len(tiny.cache) <= 2


async def test_different_prefix_gets_no_cache_hit() -> None:
    engine = SimulatedEngine()
    await run(engine, chat("x"))
    other = (await run(engine, chat("x", history=(ChatMessage("system", "Different system prompt entirely."),))))[-1]
    assert other.usage is not None and other.usage.cached_tokens == 0


async def test_max_tokens_gives_length() -> None:
    chunks = await run(SimulatedEngine(), chat("hello", max_tokens=3))
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert len(tokenize(text_of(chunks))) == 3


async def test_natural_stop_is_within_budget() -> None:
    for i in range(10):
        chunks = await run(SimulatedEngine(), chat(f"prompt {i}", max_tokens=4096))
        assert chunks[-1].finish_reason == "stop"
        assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 48
        assert text_of(chunks).endswith(".")


async def test_stop_string_truncates_and_reports_sequence() -> None:
    full = text_of(await run(SimulatedEngine(), chat("stop test")))
    words = full.split(" ")
    # Spans a token boundary: the tokens up to words[2] must be held back, not leaked,
    # until the next token shows whether the stop string completes.
    stop = words[2] + " " + words[3][:2]
    chunks = await run(SimulatedEngine(), chat("stop test", stop=(stop,)))
    text = text_of(chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stop_sequence == stop
    assert text == full[: full.index(stop)]
    assert stop not in text


async def test_tool_call_on_weather_with_valid_json_arguments() -> None:
    chunks = await run(SimulatedEngine(), chat("what is the weather in Paris?", tools=(OTHER_TOOL, WEATHER_TOOL)))
    calls = [tc for c in chunks for tc in c.tool_calls]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "get_weather"  # the weather-looking tool, not merely the first
    assert call.id.startswith("call_") and len(call.id) > 8
    args = json.loads(call.arguments)
    assert set(args) == {"city", "days", "celsius", "lat", "unit"}
    assert isinstance(args["city"], str) and isinstance(args["days"], int)
    assert isinstance(args["celsius"], bool) and isinstance(args["lat"], float)
    assert args["unit"] == "metric"
    assert chunks[-1].finish_reason == "tool_calls"
    assert text_of(chunks) == ""


async def test_tool_choice_rules() -> None:
    engine = SimulatedEngine()
    none = await run(engine, chat("weather?", tools=(WEATHER_TOOL,), tool_choice="none"))
    assert not any(c.tool_calls for c in none) and none[-1].finish_reason == "stop"
    auto = await run(engine, chat("hello", tools=(WEATHER_TOOL,), tool_choice="auto"))
    assert not any(c.tool_calls for c in auto)
    required = await run(engine, chat("hello", tools=(OTHER_TOOL, WEATHER_TOOL), tool_choice="required"))
    assert [tc.name for c in required for tc in c.tool_calls] == ["read_file"]
    named = await run(engine, chat("hello", tools=(OTHER_TOOL, WEATHER_TOOL), tool_choice={"name": "get_weather"}))
    assert [tc.name for c in named for tc in c.tool_calls] == ["get_weather"]
    no_tools = await run(engine, chat("weather?"))
    assert not any(c.tool_calls for c in no_tools)


def calls_of(chunks: list[GenerationChunk]) -> list[ToolCall]:
    return [tc for c in chunks for tc in c.tool_calls]


async def test_sim_call_directive_calls_the_named_tool_with_given_arguments() -> None:
    prompt = 'Please look at this.\n@sim-call read_file {"path": "/tmp/x.txt"}\nThanks'
    chunks = await run(SimulatedEngine(), chat(prompt, tools=(WEATHER_TOOL, OTHER_TOOL)))
    calls = calls_of(chunks)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("read_file", {"path": "/tmp/x.txt"})]
    assert chunks[-1].finish_reason == "tool_calls" and text_of(chunks) == ""
    # The call costs the tokens of its name and arguments, as any generated call.
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == len(tokenize("read_file " + calls[0].arguments))


async def test_sim_call_directive_without_arguments_generates_them_from_the_schema() -> None:
    chunks = await run(SimulatedEngine(), chat("@sim-call get_weather", tools=(OTHER_TOOL, WEATHER_TOOL)))
    (call,) = calls_of(chunks)
    assert call.name == "get_weather"
    assert set(json.loads(call.arguments)) == {"city", "days", "celsius", "lat", "unit"}
    assert chunks[-1].finish_reason == "tool_calls"


async def test_sim_call_directive_that_does_not_apply_is_plain_text() -> None:
    engine = SimulatedEngine()
    not_offered = await run(engine, chat("@sim-call delete_everything {}", tools=(OTHER_TOOL,)))
    assert not calls_of(not_offered) and text_of(not_offered)
    not_an_object = await run(engine, chat("@sim-call read_file [1, 2]", tools=(OTHER_TOOL,)))
    assert not calls_of(not_an_object)
    bad_json = await run(engine, chat('@sim-call read_file {"path": }', tools=(OTHER_TOOL,)))
    assert not calls_of(bad_json)
    inline = await run(engine, chat("say @sim-call read_file in a sentence", tools=(OTHER_TOOL,)))
    assert not calls_of(inline)
    no_tools = await run(engine, chat("@sim-call read_file"))
    assert not calls_of(no_tools)
    refused = await run(engine, chat("@sim-call read_file", tools=(OTHER_TOOL,), tool_choice="none"))
    assert not calls_of(refused)
    # A later well-formed directive still counts after a malformed one.
    second = await run(
        engine, chat('@sim-call read_file {oops}\n@sim-call read_file {"path": "a"}', tools=(OTHER_TOOL,))
    )
    assert [json.loads(c.arguments) for c in calls_of(second)] == [{"path": "a"}]


async def test_sim_call_directive_and_tool_choice() -> None:
    engine = SimulatedEngine()
    tools = (WEATHER_TOOL, OTHER_TOOL)
    required = await run(engine, chat('@sim-call read_file {"path": "r"}', tools=tools, tool_choice="required"))
    assert [(c.name, c.arguments) for c in calls_of(required)] == [("read_file", '{"path": "r"}')]
    # A named tool_choice wins over a directive for another tool.
    named = await run(
        engine, chat('@sim-call read_file {"path": "r"}', tools=tools, tool_choice={"name": "get_weather"})
    )
    assert [c.name for c in calls_of(named)] == ["get_weather"]
    same = await run(engine, chat('@sim-call read_file {"path": "r"}', tools=tools, tool_choice={"name": "read_file"}))
    assert [c.arguments for c in calls_of(same)] == ['{"path": "r"}']


async def test_sim_call_directive_answers_in_words_after_the_tool_result() -> None:
    first = chat('@sim-call read_file {"path": "a"}', tools=(OTHER_TOOL,))
    (call,) = calls_of(await run(SimulatedEngine(), first))
    follow_up = GenerationRequest(
        request_id="r2",
        model=SIM_LARGE,
        sampling=SamplingParams(max_tokens=200),
        messages=(
            *first.messages,
            ChatMessage("assistant", "", tool_calls=(call,)),
            ChatMessage("tool", "file contents", tool_call_id=call.id),
        ),
        tools=(OTHER_TOOL,),
    )
    chunks = await run(SimulatedEngine(), follow_up)
    assert not calls_of(chunks) and text_of(chunks) and chunks[-1].finish_reason == "stop"


async def test_reasoning_only_on_large_when_asked() -> None:
    large = await run(SimulatedEngine(), chat("please think about this"))
    reasoning = "".join(c.reasoning for c in large)
    assert reasoning and text_of(large)
    first_reasoning = next(i for i, c in enumerate(large) if c.reasoning)
    first_text = next(i for i, c in enumerate(large) if c.text)
    assert first_reasoning < first_text
    small = await run(SimulatedEngine(), chat("please think about this", model=SIM_SMALL))
    assert not any(c.reasoning for c in small)
    plain = await run(SimulatedEngine(), chat("no pondering here"))
    assert not any(c.reasoning for c in plain)


async def test_completion_prompt() -> None:
    req = GenerationRequest("p", SIM_SMALL, SamplingParams(max_tokens=5), prompt="def add(a, b):")
    chunks = await run(SimulatedEngine(), req)
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == len(tokenize("def add(a, b):"))
    assert chunks[-1].usage.completion_tokens == 5


async def test_abort_stops_at_next_token() -> None:
    engine = SimulatedEngine()
    gen = engine.generate(chat("long answer", rid="ab", max_tokens=4096))
    first = await anext(gen)
    assert first.text and "ab" in engine.in_flight
    await engine.abort("ab")
    rest = [c async for c in gen]
    assert len(rest) == 1 and rest[0].finish_reason == "abort"
    assert rest[0].usage is not None and rest[0].usage.completion_tokens == 1
    assert engine.aborted == ["ab"]
    assert engine.in_flight == set()


async def test_abort_unknown_id_is_harmless_and_not_remembered() -> None:
    engine = SimulatedEngine()
    await engine.abort("nope")
    chunks = await run(engine, chat("x", rid="nope"))
    assert chunks[-1].finish_reason == "stop"
    assert engine.aborted == []


async def test_aclose_and_task_cancel_stop_generation() -> None:
    engine = SimulatedEngine()
    gen = engine.generate(chat("x", rid="closed"))
    await anext(gen)
    await gen.aclose()
    assert engine.in_flight == set() and engine.aborted == ["closed"]

    slow = SimulatedEngine(tokens_per_s=50)
    seen: list[GenerationChunk] = []
    first = asyncio.Event()

    async def consume() -> None:
        async for c in slow.generate(chat("x", rid="cancelled", max_tokens=4096)):
            seen.append(c)
            first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slow.aborted == ["cancelled"] and slow.in_flight == set()
    assert seen[-1].finish_reason is None


async def test_pacing_uses_ttft_and_rate() -> None:
    engine = SimulatedEngine(ttft_s=0.05, tokens_per_s=200)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    gen = engine.generate(chat("x", max_tokens=5))
    await anext(gen)
    ttft = loop.time() - t0
    async for _ in gen:
        pass
    total = loop.time() - t0
    assert ttft >= 0.045
    assert total >= 0.045 + 4 / 200 * 0.9


async def test_failure_injection() -> None:
    engine = SimulatedEngine()
    with pytest.raises(EngineError) as before:
        await run(engine, chat(f"please {FAIL_BEFORE_FIRST_TOKEN}"))
    assert before.value.before_first_token is True

    got: list[GenerationChunk] = []
    with pytest.raises(EngineError) as mid:
        async for c in engine.generate(chat(f"please {FAIL_MID_STREAM}", rid="mid")):
            got.append(c)
    assert mid.value.before_first_token is False
    assert len(got) == 3
    assert engine.in_flight == set()
    assert engine.aborted == []


async def test_unknown_or_wrong_kind_model_is_unknown_model() -> None:
    engine = SimulatedEngine()
    with pytest.raises(UnknownModel):
        await run(engine, chat("x", model="hf:packserve/nope"))
    with pytest.raises(UnknownModel):
        await run(engine, chat("x", model="HF:packserve/sim-large"))
    with pytest.raises(UnknownModel):
        await engine.embed(EmbeddingRequest("e", SIM_LARGE, ("x",)))
    with pytest.raises(UnknownModel):
        await engine.count_tokens("nope", (), "x", ())


async def test_embeddings_deterministic_unit_vectors() -> None:
    engine = SimulatedEngine()
    res = await engine.embed(EmbeddingRequest("e", SIM_EMBED, ("hello world", "other text", "hello world")))
    assert len(res.vectors) == 3
    assert all(len(v) == 64 for v in res.vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0, rel_tol=1e-9) for v in res.vectors)
    assert res.vectors[0] == res.vectors[2] != res.vectors[1]
    assert res.prompt_tokens == 2 + 2 + 2


def test_template_is_prefix_stable_when_appending_turns() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    turn1 = (SYSTEM, ChatMessage("user", "weather?"))
    turn2 = (
        *turn1,
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    )
    p1 = tokenize(render_chat_prompt(turn1, (WEATHER_TOOL,)))
    p2 = tokenize(render_chat_prompt(turn2, (WEATHER_TOOL,)))
    assert p2[: len(p1)] == p1 and len(p2) > len(p1)
    assert "get_weather" in render_chat_prompt(turn2, (WEATHER_TOOL,))


def test_tokenizer_splits_long_words_and_digits() -> None:
    assert tokenize("Hello, world!") == ["Hello", ",", "world", "!"]
    assert tokenize("1234567") == ["123", "456", "7"]
    assert len(tokenize("a" * 30)) == 3


async def test_ignore_eos_and_min_tokens_set_exact_lengths_as_vllm_does() -> None:
    def sampled(**extra: object) -> GenerationRequest:
        req = chat("hello there", max_tokens=200)
        return dataclasses.replace(req, sampling=dataclasses.replace(req.sampling, **extra))  # type: ignore[arg-type]

    exact = await run(SimulatedEngine(), sampled(ignore_eos=True))
    assert exact[-1].finish_reason == "length"
    assert exact[-1].usage is not None and exact[-1].usage.completion_tokens == 200
    at_least = await run(SimulatedEngine(), sampled(min_tokens=120))
    assert at_least[-1].finish_reason == "stop"
    assert at_least[-1].usage is not None and 120 <= at_least[-1].usage.completion_tokens <= 200
    # min_tokens above max_tokens: the length limit still wins.
    capped = await run(SimulatedEngine(), sampled(min_tokens=500))
    assert capped[-1].usage is not None and capped[-1].usage.completion_tokens == 200


async def test_max_seqs_runs_at_most_n_and_the_rest_wait_in_arrival_order() -> None:
    engine = SimulatedEngine(max_seqs=2)
    events: list[tuple[str, str]] = []

    async def consume(rid: str) -> None:
        first = True
        async for _ in engine.generate(chat(f"request {rid}", rid=rid, max_tokens=6)):
            if first:
                events.append(("start", rid))
                first = False
        events.append(("end", rid))

    tasks = [asyncio.ensure_future(consume(f"r{i}")) for i in range(5)]
    await asyncio.gather(*tasks)
    assert [rid for kind, rid in events if kind == "start"] == ["r0", "r1", "r2", "r3", "r4"]
    running = 0
    for kind, _ in events:
        running += 1 if kind == "start" else -1
        assert running <= 2, events
    assert engine.peak_running[SIM_LARGE] == 2 and engine.running[SIM_LARGE] == 0


def long_answer(rid: str, owner: str, preempt: str | None = None, tokens: int = 40,
                **sampling: Any) -> GenerationRequest:
    req = chat(f"request {rid}", rid=rid, max_tokens=tokens)
    return dataclasses.replace(req, owner=owner, preempt=preempt, sampling=dataclasses.replace(
        req.sampling, ignore_eos=True, **sampling))


async def test_a_preempting_request_takes_a_running_sequence_which_resumes_unchanged() -> None:
    engine = SimulatedEngine(max_seqs=2)
    chunks: dict[str, list[GenerationChunk]] = {"h1": [], "h2": [], "l1": []}
    ends: list[str] = []
    under_way = {"h1": asyncio.Event(), "h2": asyncio.Event()}

    async def consume(req: GenerationRequest) -> None:
        async for chunk in engine.generate(req):
            chunks[req.request_id].append(chunk)
            if len(chunks[req.request_id]) == 5 and req.request_id in under_way:
                under_way[req.request_id].set()
        ends.append(req.request_id)

    heavy = [asyncio.ensure_future(consume(long_answer(rid, "heavy"))) for rid in ("h1", "h2")]
    for event in under_way.values():
        await event.wait()
    light = asyncio.ensure_future(consume(long_answer("l1", "light", preempt="heavy", tokens=10)))
    await asyncio.gather(light, *heavy)
    # The light request ran to its end while both heavy ones still had output to give; the younger
    # heavy sequence (h2) was the one paused.
    assert ends[0] == "l1" and engine.preempted == ["h2"]
    assert engine.peak_running[SIM_LARGE] == 2 and engine.running[SIM_LARGE] == 0
    for rid in ("h1", "h2"):
        alone = await run(SimulatedEngine(), long_answer(rid, "heavy"))
        last, alone_last = chunks[rid][-1], alone[-1]
        assert text_of(chunks[rid]) == text_of(alone) and last.finish_reason == alone_last.finish_reason, rid
        assert last.usage is not None and alone_last.usage is not None
        assert last.usage.completion_tokens == alone_last.usage.completion_tokens == 40


async def test_nothing_is_preempted_with_a_free_sequence_or_without_a_resumable_victim() -> None:
    engine = SimulatedEngine(max_seqs=2)
    # A free sequence: the preempting request just takes it.
    assert (await run(engine, long_answer("l0", "light", preempt="heavy")))[-1].finish_reason == "length"
    started = {"h1": asyncio.Event(), "h2": asyncio.Event()}

    async def consume(req: GenerationRequest) -> None:
        async for _ in engine.generate(req):
            if req.request_id in started:
                started[req.request_id].set()

    # Seeded answers cannot be resumed unchanged: the preempting request waits its turn.
    heavy = [asyncio.ensure_future(consume(long_answer(rid, "heavy", seed=7))) for rid in ("h1", "h2")]
    for event in started.values():
        await event.wait()
    await asyncio.gather(consume(long_answer("l1", "light", preempt="heavy")), *heavy)
    assert engine.preempted == [] and engine.peak_running[SIM_LARGE] == 2


async def test_a_request_waiting_in_the_engine_can_be_cancelled() -> None:
    engine = SimulatedEngine(max_seqs=1)
    holder = engine.generate(chat("hold", rid="hold", max_tokens=50))
    await holder.__anext__()  # holds the only sequence
    waiting = asyncio.ensure_future(run(engine, chat("wait", rid="wait", max_tokens=3)))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiting.done() and engine.running[SIM_LARGE] == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await holder.aclose()
    assert engine.running[SIM_LARGE] == 0
    # The sequence is free again: the next request runs.
    chunks = await run(engine, chat("next", rid="next", max_tokens=3))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3


def test_max_seqs_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_seqs"):
        SimulatedEngine(max_seqs=0)
