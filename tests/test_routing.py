"""The prefix-affinity decision as tables, without Ray (serve_apps.deploy.routing's pure layer)."""

from __future__ import annotations

import asyncio
import time

import pytest

from serve_apps.config import AppConfig
from serve_apps.deploy.routing import (
    HOME_SLACK,
    Candidate,
    Choice,
    PrefixTable,
    choose,
    conversation_key,
    home_rank,
    prefix_blocks,
    prefix_text,
    request_blocks,
)
from serve_apps.deploy.serving_plan import plan
from serve_apps.engines.sim import SIM_LARGE, SimulatedEngine
from serve_apps.engines.types import ChatMessage, GenerationRequest, SamplingParams, ToolSpec

C = Candidate

# (case, candidates, max_queue, expected choice); `continues=True` means the
# request extends a prompt that replica was sent (a conversation's next turn).
CASES: list[tuple[str, list[Candidate], int, Choice]] = [
    ("the replica the conversation continues on wins over an idle one",
     [C("a", 3, matched=5, continues=True), C("b", 0)], 4, Choice("a", "affinity")),
    ("the longest continued prefix wins",
     [C("a", 0, matched=2, continues=True), C("b", 0, matched=7, continues=True)], 4, Choice("b", "affinity")),
    ("at the threshold the preferred replica still gets it",
     [C("a", 4, matched=5, continues=True), C("b", 0)], 4, Choice("a", "affinity")),
    ("over the threshold: the least-loaded replica",
     [C("a", 5, matched=5, continues=True), C("b", 1), C("c", 0)], 4, Choice("c", "overloaded")),
    ("over the threshold but everyone is as busy: keep the prefix",
     [C("a", 6, matched=5, continues=True, held=90), C("b", 6, held=10)], 4, Choice("a", "overloaded")),
    ("max_queue 0 means only an idle preferred replica keeps affinity",
     [C("a", 1, matched=5, continues=True), C("b", 0)], 0, Choice("b", "overloaded")),
    ("no match anywhere: least loaded",
     [C("a", 2), C("b", 1), C("c", 3)], 4, Choice("b", "no_match")),
    ("no match, equal load: the emptier table takes the new conversation",
     [C("a", 0, held=40), C("b", 0, held=10)], 4, Choice("b", "no_match")),
    ("no match, equal load and tables: the replica that waited longest",
     [C("a", 0, last_routed=9), C("b", 0, last_routed=3)], 4, Choice("b", "no_match")),
    ("a shared prefix the request diverges from (a system prompt) prefers nobody",
     [C("a", 0, matched=3, held=50), C("b", 0, held=10)], 4, Choice("b", "no_match")),
    ("a shared prefix still breaks a tie between equally full tables",
     [C("a", 0, matched=3, held=10), C("b", 0, held=10)], 4, Choice("a", "no_match")),
    ("a continuation beats a longer merely shared prefix",
     [C("a", 0, matched=9), C("b", 2, matched=4, continues=True)], 4, Choice("b", "affinity")),
    ("two replicas continuing the same prefix: the less loaded one",
     [C("a", 3, matched=6, continues=True), C("b", 1, matched=6, continues=True), C("c", 0)], 4,
     Choice("b", "affinity")),
    ("a single replica is always chosen",
     [C("a", 99, matched=1, continues=True)], 4, Choice("a", "overloaded")),
    ("ties are broken by id, so the choice is deterministic",
     [C("b", 0), C("a", 0)], 4, Choice("a", "no_match")),
]


@pytest.mark.parametrize(("case", "candidates", "max_queue", "expected"), CASES, ids=[c[0] for c in CASES])
def test_choose(case: str, candidates: list[Candidate], max_queue: int, expected: Choice) -> None:
    assert choose(candidates, max_queue) == expected
    assert choose(list(reversed(candidates)), max_queue) == expected, "order of candidates must not matter"


def test_choose_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        choose([], 4)
    with pytest.raises(ValueError, match="max_queue"):
        choose([C("a", 0)], -1)


# -- the key ----------------------------------------------------------------------------------

def chat(*turns: tuple[str, str], model: str = SIM_LARGE, tools: tuple[ToolSpec, ...] = ()) -> GenerationRequest:
    messages = tuple(ChatMessage(role, content) for role, content in turns)  # type: ignore[arg-type]
    return GenerationRequest(request_id="r", model=model, sampling=SamplingParams(max_tokens=8), messages=messages,
                             tools=tools)


def test_blocks_are_a_chain_over_whole_blocks() -> None:
    blocks = prefix_blocks("a" * 64 * 3 + "tail", "m", block_chars=64)
    assert len(blocks) == 3  # the partial tail block is not hashed
    assert len(set(blocks)) == 3  # equal text, different positions: different hashes
    assert prefix_blocks("a" * 64 * 3, "m", block_chars=64) == blocks
    assert prefix_blocks("b" + "a" * 191, "m", block_chars=64)[1:] != blocks[1:]  # block 1 depends on block 0
    assert prefix_blocks("a" * 192, "other-model", block_chars=64)[0] != blocks[0]
    assert len(prefix_blocks("a" * 64 * 10, "m", block_chars=64, max_blocks=4)) == 4
    assert prefix_blocks("short", "m") == ()


def test_a_conversations_next_turn_extends_its_key() -> None:
    turn1 = chat(("system", "You are terse. " * 8), ("user", "Explain the cache in detail, please. " * 4))
    turn2 = chat(*[(m.role, m.content) for m in turn1.messages], ("assistant", "It stores blocks. " * 6),
                 ("user", "And eviction? " * 5))
    b1, b2 = request_blocks(turn1), request_blocks(turn2)
    assert len(b2) > len(b1) > 2
    assert b2[:len(b1)] == b1
    assert prefix_text(turn2).startswith(prefix_text(turn1))
    other = chat(("system", "You are terse. " * 8), ("user", "Something else entirely, at length. " * 4))
    shared = next(i for i, (x, y) in enumerate(zip(b1, request_blocks(other), strict=False)) if x != y)
    assert 0 < shared < len(b1)  # the shared system prompt, then they diverge
    tool = ToolSpec("get_weather", "weather", {"type": "object"})
    assert request_blocks(chat(*[(m.role, m.content) for m in turn1.messages], tools=(tool,)))[0] != b1[0]
    completion = GenerationRequest(request_id="c", model=SIM_LARGE, sampling=SamplingParams(max_tokens=1),
                                   prompt="x" * 200)
    assert prefix_text(completion) == "x" * 200


# -- what each replica holds ------------------------------------------------------------------

def test_table_matches_the_longest_held_leading_run_and_knows_where_prompts_ended() -> None:
    table = PrefixTable(capacity_blocks=100)
    conv = prefix_blocks("q" * 64 * 6, "m", block_chars=64)
    table.record("a", conv[:4])
    assert table.lookup("a", conv) == (4, True)  # the next turn continues the prompt that ended at block 4
    assert table.lookup("a", conv[:2]) == (2, False)  # a prefix of it, but no prompt ended there
    diverging = conv[:2] + prefix_blocks("z" * 64 * 4, "m", block_chars=64)
    assert table.lookup("a", diverging) == (2, False)
    assert table.lookup("b", conv) == (0, False)
    assert table.held("a") == 4
    table.record("a", conv[:2])  # a prompt that ends at block 2 marks it for good
    assert table.lookup("a", diverging) == (2, True)
    table.retain(["b"])
    assert table.held("a") == 0
    table.record("b", conv)
    table.drop("b")
    assert table.lookup("b", conv) == (0, False)


def test_table_forgets_least_recently_used_blocks() -> None:
    table = PrefixTable(capacity_blocks=4)
    old = prefix_blocks("o" * 64 * 3, "m", block_chars=64)
    new = prefix_blocks("n" * 64 * 3, "m", block_chars=64)
    table.record("a", old)
    table.record("a", new)
    assert table.held("a") == 4
    assert table.lookup("a", new) == (3, True)
    assert table.lookup("a", old) == (0, False)  # its first block went first


def test_table_as_the_router_uses_it_keeps_conversations_apart_and_balanced() -> None:
    """Two replicas, eight conversations of four turns sharing a system prompt, routed as the Ray adapter does."""
    table = PrefixTable()
    last: dict[str, int] = {}
    placed: dict[int, set[str]] = {}
    seq = 0
    system = ("system", "You are a careful assistant for the storage team, answer in detail. " * 3)
    histories = {c: [system, ("user", f"conversation {c} opens with a question about topic {c}. " * 3)]
                 for c in range(8)}
    for _turn in range(4):
        for c, history in histories.items():
            blocks = request_blocks(chat(*history))
            candidates = [C(r, 0, *table.lookup(r, blocks), table.held(r), last.get(r, 0)) for r in ("r1", "r2")]
            replica = choose(candidates, 8).replica
            seq += 1
            last[replica] = seq
            table.record(replica, blocks)
            placed.setdefault(c, set()).add(replica)
            history += [("assistant", f"answer {len(history)} for {c}. " * 4), ("user", f"follow-up {c}. " * 3)]
    assert all(len(replicas) == 1 for replicas in placed.values()), placed
    per_replica = [sum(1 for r in placed.values() if "r1" in r), sum(1 for r in placed.values() if "r2" in r)]
    assert per_replica == [4, 4]


def test_shared_mode_sends_unseen_conversations_home_within_the_slack() -> None:
    hi, lo = b"\xff", b"\x01"
    # Unseen conversation: the highest rank wins while it is within HOME_SLACK of the least loaded.
    assert choose([C("a", 0, rank=lo), C("b", HOME_SLACK, rank=hi)], 8) == Choice("b", "home")
    assert choose([C("a", 0, rank=lo), C("b", HOME_SLACK + 1, rank=hi)], 8) == Choice("a", "no_match")
    assert choose([C("a", 5, rank=lo), C("b", 5, rank=hi)], 4) == Choice("a", "no_match")  # home over max_queue
    # What this gateway knows (a continuation) still beats the guess.
    assert choose([C("a", 0, matched=4, continues=True, rank=lo), C("b", 0, rank=hi)], 8) == Choice("a", "affinity")
    # Without ranks (one gateway replica) nothing changes.
    assert choose([C("a", 0, held=10), C("b", 0, held=40)], 8) == Choice("a", "no_match")


def test_conversation_key_is_stable_across_turns_and_apart_across_conversations() -> None:
    system = ("system", "You are a careful assistant. " * 20)
    one = [system, ("user", "conversation one")]
    two = [system, ("user", "conversation two")]
    assert conversation_key(chat(*one)) == conversation_key(chat(*one, ("assistant", "a"), ("user", "more")))
    assert conversation_key(chat(*one)) != conversation_key(chat(*two))
    # A shared system prompt alone is not a conversation: the first user message is part of the key.
    assert conversation_key(chat(system, ("user", "x"))) != conversation_key(chat(system, ("user", "y")))


def test_several_gateways_keep_a_conversation_on_one_replica_in_shared_mode() -> None:
    """Four gateways, each with its own table, take turns in rotation (as HAProxy spreads requests)."""
    replicas = ("r1", "r2")
    tables = [PrefixTable() for _ in range(4)]
    placed: dict[int, list[str]] = {}
    load = dict.fromkeys(replicas, 0)
    histories = {c: [("system", "Shared system prompt for every conversation. " * 4),
                     ("user", f"conversation {c} is about topic {c}. " * 3)] for c in range(16)}
    n = 0
    for _turn in range(4):
        for c, history in histories.items():
            table = tables[n % len(tables)]  # a different gateway than the conversation's previous turn
            n += 1
            request = chat(*history)
            blocks, key = request_blocks(request), conversation_key(request)
            candidates = [C(r, load[r], *table.lookup(r, blocks), table.held(r), rank=home_rank(key, r))
                          for r in replicas]
            replica = choose(candidates, 8).replica
            table.record(replica, blocks)
            placed.setdefault(c, []).append(replica)
            history += [("assistant", f"answer for {c}. " * 4), ("user", f"follow-up {c}. " * 3)]
    assert all(len(set(turns)) == 1 for turns in placed.values()), placed
    homes = [turns[0] for turns in placed.values()]
    # Homes are a hash: 16 conversations split about evenly (fixed keys, so a fixed split; 8/8 ± 4 allowed).
    assert min(homes.count(r) for r in replicas) >= 4, homes


# -- the wiring -------------------------------------------------------------------------------

def test_plan_routes_chat_models_by_affinity_by_default() -> None:
    config = AppConfig.model_validate({"engine": "sim", "models": [
        {"id": SIM_LARGE, "features": ["tools", "streaming", "reasoning"], "affinity_max_queue": 3},
        {"id": "hf:packserve/sim-small", "routing": "default"},
        {"id": "hf:packserve/sim-embed", "kind": "embeddings", "size_class": "unmetered"}]})
    plans = {p.model_id: p for p in plan(config)}
    assert plans[SIM_LARGE].routing == "affinity"
    assert plans[SIM_LARGE].router_kwargs == {"max_queue": 3, "shared": False}  # one gateway replica
    assert plans["hf:packserve/sim-small"].routing == "default"
    assert plans["hf:packserve/sim-embed"].routing == "default"  # embeddings have no prefix cache
    assert plans[SIM_LARGE].describe()["routing"] == "affinity"
    several = config.model_copy(update={"gateway": config.gateway.model_copy(update={
        "autoscaling": config.gateway.autoscaling.model_copy(update={"max_replicas": 4})})})
    assert {p.model_id: p for p in plan(several)}[SIM_LARGE].router_kwargs["shared"] is True


def test_cold_start_timeout_per_model_falls_back_to_base_then_gateway() -> None:
    config = AppConfig.model_validate({"engine": "vllm", "gateway": {"cold_start_timeout_s": 120}, "models": [
        {"id": "hf:org/base", "cold_start_timeout_s": 900, "vllm": {"model": "/m"}},
        {"id": "hf:org/base-lora", "kind": "lora", "base_model": "hf:org/base", "adapter_path": "/a"},
        {"id": "hf:org/other", "vllm": {"model": "/o"}}]})
    assert config.cold_start_timeout("hf:org/base-lora") == 900
    assert config.cold_start_timeout("hf:org/other") == 120
    assert config.cold_start_timeout("hf:org/unknown") == 120


# -- the simulated engine's prefill cost (what makes affinity visible in time to first token) --

async def test_sim_prefill_costs_only_uncached_tokens() -> None:
    engine = SimulatedEngine(prefill_s_per_uncached_token=0.002)
    request = chat(("user", "a long question about the prefix cache and routing. " * 6))

    async def ttft() -> tuple[float, int]:
        started = time.monotonic()
        async for chunk in engine.generate(request):
            assert chunk.usage is not None
            return time.monotonic() - started, chunk.usage.cached_tokens
        raise AssertionError("no chunk")

    cold, cached0 = await ttft()
    warm, cached1 = await ttft()
    assert cached0 == 0 and cached1 > 0
    assert cold > 0.1 and warm < cold / 3


async def test_sim_prefills_one_request_at_a_time() -> None:
    engine = SimulatedEngine(prefill_s_per_uncached_token=0.001)

    async def run(i: int) -> None:
        async for _ in engine.generate(chat(("user", f"distinct prompt {i} " + "word " * 60))):
            pass

    started = time.monotonic()
    await asyncio.gather(*(run(i) for i in range(3)))
    assert time.monotonic() - started > 3 * 0.06  # serialized: three prefills of ~64 tokens each
