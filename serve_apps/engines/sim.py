"""A deterministic simulated engine, for tests and benchmarks only.

It produces no meaningful text: every output is a pure function of the model,
the prompt tokens and the seed, so tests can assert exact results. What it
does simulate faithfully is what the rest of packserve depends on: token
counts, a per-instance prefix cache (so `cached_tokens` behaves like vLLM's
automatic prefix caching), streaming pacing, tool calls, reasoning deltas,
aborts and failures before or after the first token.

Tool calls come from three cues, checked in this order:

- `tool_choice`: "none" never calls; "required" or a named tool always calls
  (the named one, or the first offered).
- A directive line in the latest user turn: `@sim-call NAME {json-args}` on a
  line of its own makes the model answer with exactly that call of the
  offered tool NAME (finish reason `tool_calls`). The JSON object is
  optional; without it the arguments are generated from the tool's schema.
  A directive naming a tool that is not offered, or whose arguments are not
  a JSON object, is ordinary text. This is how tests make a real client
  (Claude Code, opencode) run one of its own tools end to end.
- The word "weather" in the latest user turn calls the weather-looking tool
  (or the first offered).

When the last message is a tool result the model answers in words instead
(unless `tool_choice` forces a call), as a real model does after a tool ran.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
from collections import OrderedDict
from collections.abc import AsyncGenerator, Iterable, Sequence
from typing import Any

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.preemption import Seat, choose_victim, resumable
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineError,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    PromptTooLong,
    TokenUsage,
    ToolCall,
    ToolSpec,
)

SIM_LARGE = "hf:packserve/sim-large"
SIM_SMALL = "hf:packserve/sim-small"
SIM_EMBED = "hf:packserve/sim-embed"

EMBEDDING_DIM = 64
FAIL_BEFORE_FIRST_TOKEN = "__sim_fail_before_first_token__"
FAIL_MID_STREAM = "__sim_fail_mid_stream__"
# A mid-stream failure after this many tokens leaves something billable behind.
FAIL_MID_STREAM_AFTER = 3

SIM_CARDS: tuple[ModelCard, ...] = (
    ModelCard(
        id=SIM_LARGE,
        kind="chat",
        size_class="standard",
        input_price_micro=1_200_000,
        output_price_micro=3_400_000,
        context_length=32768,
        max_output_tokens=4096,
        features=("tools", "streaming", "reasoning"),
    ),
    ModelCard(
        id=SIM_SMALL,
        kind="chat",
        size_class="small",
        input_price_micro=300_000,
        output_price_micro=2_000_000,
        context_length=32768,
        max_output_tokens=4096,
        features=("tools", "streaming"),
    ),
    ModelCard(
        id=SIM_EMBED,
        kind="embeddings",
        size_class="unmetered",
        input_price_micro=0,
        output_price_micro=0,
        context_length=8192,
        max_output_tokens=0,
        features=(),
    ),
)

# ASCII words are capped at 12 letters and digits grouped by 3 so a long blob
# (base64, minified code) costs many tokens, roughly as a real BPE would.
_TOKEN_RE = re.compile(r"[A-Za-z]{1,12}|\d{1,3}|\S")

# Every vocabulary entry is exactly one token under `_TOKEN_RE`, so re-counting
# generated text gives the same number the engine reported.
_VOCAB: tuple[str, ...] = (
    "the", "model", "token", "cache", "request", "stream", "packserve", "value", "function",
    "returns", "a", "list", "of", "results", "for", "each", "input", "and", "then", "writes",
    "output", "to", "file", "test", "passes", "when", "config", "is", "valid", "this", "code",
    "uses", "async", "loop", "with", "small", "batch", "size", "so", "latency", "stays", "low",
)  # fmt: skip
_PUNCT: tuple[str, ...] = (",", ".")
_REASONING_WORDS: tuple[str, ...] = (
    "first", "check", "the", "question", "then", "plan", "an", "answer", "step", "by", "step",
)  # fmt: skip


def tokenize(text: str) -> list[str]:
    """The simulated tokenizer: one token per short word, digit group or symbol."""
    return _TOKEN_RE.findall(text)


def render_chat_prompt(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec]) -> str:
    """Render a chat as the prompt text the simulated model would see.

    Tools come first and each message is closed before the next opens, and the
    generation prompt (`<|assistant|>`) is exactly how the next assistant
    message will begin, so appending turns keeps every earlier token in place:
    that is what lets the prefix cache hit on a growing conversation.
    """
    parts: list[str] = []
    if tools:
        schemas = [{"name": t.name, "description": t.description, "parameters": t.parameters} for t in tools]
        parts.append("<|tools|>\n" + json.dumps(schemas, sort_keys=True) + "\n<|end|>\n")
    for m in messages:
        head = f"<|{m.role}|>"
        if m.name:
            head += f" name={m.name}"
        if m.tool_call_id:
            head += f" call={m.tool_call_id}"
        body = m.content
        for call in m.tool_calls:
            body += f"\n<|tool_call|> {call.id} {call.name} {call.arguments}"
        parts.append(f"{head}\n{body}\n<|end|>\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def _digest(*parts: bytes | str) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\x00")
    return h.digest()


class _PrefixCache:
    """LRU of token blocks keyed by a hash chain, like vLLM's prefix caching.

    A block's key covers every token before it, so a hit on block k implies the
    whole prefix up to k matched; counting stops at the first miss.
    """

    def __init__(self, capacity_blocks: int, block_tokens: int) -> None:
        self.capacity = capacity_blocks
        self.block_tokens = block_tokens
        self._blocks: OrderedDict[bytes, None] = OrderedDict()

    def _keys(self, namespace: str, tokens: Sequence[str]) -> list[bytes]:
        keys: list[bytes] = []
        prev = _digest("prefix-cache", namespace)
        for start in range(0, len(tokens) - self.block_tokens + 1, self.block_tokens):
            prev = _digest(prev, "\x01".join(tokens[start : start + self.block_tokens]))
            keys.append(prev)
        return keys

    def lookup_and_insert(self, namespace: str, tokens: Sequence[str]) -> int:
        """Return how many leading prompt tokens were cached, then cache the prompt."""
        keys = self._keys(namespace, tokens)
        hits = 0
        for key in keys:
            if key not in self._blocks:
                break
            hits += 1
        self.insert_keys(keys)
        # The last prompt token is always recomputed to get the next-token logits,
        # so a fully cached prompt still reports at most one block less (as vLLM does).
        max_cacheable = max(len(tokens) - 1, 0) // self.block_tokens
        return min(hits, max_cacheable) * self.block_tokens

    def insert(self, namespace: str, tokens: Sequence[str]) -> None:
        self.insert_keys(self._keys(namespace, tokens))

    def insert_keys(self, keys: Iterable[bytes]) -> None:
        for key in keys:
            self._blocks[key] = None
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.capacity:
            self._blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


class SimulatedEngine(Engine):
    """Deterministic simulated engine implementing `Engine`, for tests and benchmarks.

    `ttft_s` is slept before the first chunk and `1 / tokens_per_s` between
    chunks (0 = as fast as possible, still yielding to the loop between chunks
    so a disconnect can cancel it). `in_flight` and `aborted` are public so
    tests can check that a client's disconnect really stopped generation.

    `prefill_s_per_uncached_token` adds prefill time for every prompt token
    the prefix cache did not hold, one request at a time, so a cache hit
    shortens time to first token (its own and the queue's) as on a real
    engine. `start_s` is a one-off load time paid by the first `start()` (or
    the first request), like vLLM loading weights.

    `max_seqs` bounds the sequences each model runs at once (None: unlimited);
    the others wait inside the engine in arrival order, as in vLLM's waiting
    queue. `running` and `peak_running` (per model) let tests check the bound.
    A request with `preempt` that finds its model full takes over the seat of
    a running sequence (serve_apps.engines.preemption), which waits for the
    next free seat and goes on where it stopped; `preempted` lists them.
    """

    def __init__(
        self,
        ttft_s: float = 0.0,
        tokens_per_s: float = 0.0,
        cache_blocks: int = 4096,
        block_tokens: int = 16,
        prefill_s_per_uncached_token: float = 0.0,
        start_s: float = 0.0,
        max_seqs: int | None = None,
    ) -> None:
        if max_seqs is not None and max_seqs < 1:
            raise ValueError("max_seqs must be >= 1 (or None: unlimited)")
        if ttft_s < 0 or tokens_per_s < 0 or prefill_s_per_uncached_token < 0 or start_s < 0:
            raise ValueError("ttft_s, tokens_per_s, prefill_s_per_uncached_token and start_s must be >= 0")
        if cache_blocks < 0 or block_tokens < 1:
            raise ValueError("cache_blocks must be >= 0 and block_tokens >= 1")
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s
        self.prefill_s_per_uncached_token = prefill_s_per_uncached_token
        self.start_s = start_s
        self._started = start_s == 0
        self._start_lock = asyncio.Lock()
        self._prefill_lock = asyncio.Lock()
        self.block_tokens = block_tokens
        self.cache = _PrefixCache(cache_blocks, block_tokens)
        self.in_flight: set[str] = set()
        # Ids whose generation ended early because of abort() or the consumer
        # closing/cancelling the stream, in the order that happened.
        self.aborted: list[str] = []
        self.requests_started = 0
        self._abort_requested: set[str] = set()
        self._cards = {c.id: c for c in SIM_CARDS}
        self.max_seqs = max_seqs
        # asyncio.Semaphore hands a freed place to the longest waiter: arrival order.
        self._seqs: dict[str, asyncio.Semaphore] = {}
        self._seats: dict[str, dict[str, Seat]] = {}  # model -> request id -> its seat, while it has one
        self._seat_order = 0
        self.preempted: list[str] = []
        self.running: dict[str, int] = {}
        self.peak_running: dict[str, int] = {}

    def cards(self) -> list[ModelCard]:
        return list(SIM_CARDS)

    async def start(self) -> None:
        """Pay the simulated load time once; concurrent callers wait for the same load."""
        if self._started:
            return
        async with self._start_lock:
            if not self._started:
                await asyncio.sleep(self.start_s)
                self._started = True

    def _card(self, model: str, kind: str) -> ModelCard:
        card = self._cards.get(model)
        if card is None or card.kind != kind:
            # A chat request for the embeddings model (or the reverse) is as
            # unusable as an unknown id: the gateway answers 404 model_not_found.
            raise UnknownModel(model)
        return card

    def _prompt_text(self, request: GenerationRequest) -> str:
        if request.prompt is not None:
            return request.prompt
        return render_chat_prompt(request.messages, request.tools)

    async def count_tokens(
        self,
        model: str,
        messages: tuple[ChatMessage, ...],
        prompt: str | None,
        tools: tuple[ToolSpec, ...],
    ) -> int:
        self._card(model, "chat")
        text = prompt if prompt is not None else render_chat_prompt(messages, tools)
        return len(tokenize(text))

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._card(request.model, "embeddings")
        vectors = tuple(_embedding(text) for text in request.inputs)
        return EmbeddingResult(vectors=vectors, prompt_tokens=sum(len(tokenize(t)) for t in request.inputs))

    async def abort(self, request_id: str) -> None:
        # Only remember ids that are running: an abort for a finished or unknown
        # request must not linger and kill a later request reusing the id.
        if request_id in self.in_flight:
            self._abort_requested.add(request_id)

    def _seq_slot(self, model: str) -> asyncio.Semaphore | None:
        if self.max_seqs is None:
            return None
        return self._seqs.setdefault(model, asyncio.Semaphore(self.max_seqs))

    def _count_running(self, model: str, delta: int) -> None:
        now = self.running.get(model, 0) + delta
        self.running[model] = now
        self.peak_running[model] = max(self.peak_running.get(model, 0), now)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        card = self._card(request.model, "chat")
        await self.start()
        rid = request.request_id
        prompt_text = self._prompt_text(request)
        last_user = _last_user_text(request)
        if FAIL_BEFORE_FIRST_TOKEN in last_user:
            raise EngineError("simulated failure before the first token", before_first_token=True)

        prompt_tokens = tokenize(prompt_text)
        if len(prompt_tokens) > card.context_length:
            raise PromptTooLong(len(prompt_tokens), card.context_length)
        cached = self.cache.lookup_and_insert(request.model, prompt_tokens)
        plan = _plan_output(request, prompt_tokens, last_user)

        self.in_flight.add(rid)
        self.requests_started += 1
        finished = False
        emitted_tokens = 0
        seq = self._seq_slot(request.model)
        seat: Seat | None = None
        try:
            if seq is not None:
                seat = await self._take_seat(request, seq)
            prefill_s = (len(prompt_tokens) - cached) * self.prefill_s_per_uncached_token
            if prefill_s:
                # One prefill at a time, as on a compute-bound engine: uncached
                # prompts delay the requests queued behind them too.
                async with self._prefill_lock:
                    await asyncio.sleep(prefill_s)
            if self.ttft_s:
                await asyncio.sleep(self.ttft_s)
            for i, step in enumerate(plan.steps):
                if i:
                    # sleep(0) still yields to the loop, so a cancel lands between tokens.
                    await asyncio.sleep(1.0 / self.tokens_per_s if self.tokens_per_s else 0)
                if seat is not None and seat.paused and seq is not None:
                    # Paused: wait for the next free seat (the prefix cache holds its prompt and output).
                    seat = await self._next_seat(request, seq)
                if rid in self._abort_requested:
                    finished = True
                    self.aborted.append(rid)
                    yield GenerationChunk(finish_reason="abort", usage=_usage(prompt_tokens, cached, emitted_tokens))
                    return
                if FAIL_MID_STREAM in last_user and emitted_tokens >= FAIL_MID_STREAM_AFTER:
                    finished = True
                    raise EngineError("simulated failure mid-stream", before_first_token=False)
                emitted_tokens += step.tokens
                yield GenerationChunk(
                    text=step.text,
                    reasoning=step.reasoning,
                    tool_calls=step.tool_calls,
                    usage=_usage(prompt_tokens, cached, emitted_tokens),
                )
            finished = True
            # Output blocks are cached too, so the next turn (which replays this
            # answer) hits beyond the previous prompt, as with a real KV cache.
            self.cache.insert(request.model, prompt_tokens + plan.output_tokens)
            yield GenerationChunk(
                finish_reason=plan.finish_reason,
                usage=_usage(prompt_tokens, cached, emitted_tokens),
                stop_sequence=plan.stop_sequence,
            )
        finally:
            if seat is not None and seq is not None:
                self._leave_seat(request.model, seq, seat)
            if not finished and rid in self.in_flight:
                # Reached only via aclose()/cancellation: the consumer went away.
                self.aborted.append(rid)
            self.in_flight.discard(rid)
            self._abort_requested.discard(rid)


    # -- sequences and preemption ---------------------------------------------

    def _seat(self, request: GenerationRequest) -> Seat:
        self._seat_order += 1
        seat = Seat(request.request_id, request.owner, self._seat_order, resumable(request))
        self._seats.setdefault(request.model, {})[request.request_id] = seat
        return seat

    async def _take_seat(self, request: GenerationRequest, seq: asyncio.Semaphore) -> Seat:
        """With `preempt` on a full model a victim's seat (it is paused), else the next one free."""
        seats = self._seats.get(request.model, {})
        victim = (choose_victim(seats.values(), request.preempt)
                  if request.preempt is not None and seq.locked() else None)
        if victim is None:
            return await self._next_seat(request, seq)
        # The victim's seat passes to this request: the running count does not change.
        victim.paused = True
        del seats[victim.request_id]
        self.preempted.append(victim.request_id)
        return self._seat(request)

    async def _next_seat(self, request: GenerationRequest, seq: asyncio.Semaphore) -> Seat:
        await seq.acquire()
        self._count_running(request.model, +1)
        return self._seat(request)

    def _leave_seat(self, model: str, seq: asyncio.Semaphore, seat: Seat) -> None:
        if seat.paused:
            return  # its seat went to the preempting request, which releases it
        self._seats.get(model, {}).pop(seat.request_id, None)
        seq.release()
        self._count_running(model, -1)


def _usage(prompt_tokens: Sequence[str], cached: int, completion: int) -> TokenUsage:
    return TokenUsage(prompt_tokens=len(prompt_tokens), cached_tokens=cached, completion_tokens=completion)


def _last_user_text(request: GenerationRequest) -> str:
    if request.prompt is not None:
        return request.prompt
    for m in reversed(request.messages):
        if m.role == "user":
            return m.content
    return ""


def _embedding(text: str) -> tuple[float, ...]:
    raw = b"".join(_digest("embed", text, str(i)) for i in range(EMBEDDING_DIM // 16))
    values = [(b - 127.5) / 127.5 for b in raw[:EMBEDDING_DIM]]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return tuple(v / norm for v in values)


class _Step:
    __slots__ = ("reasoning", "text", "tokens", "tool_calls")

    def __init__(
        self, *, text: str = "", reasoning: str = "", tool_calls: tuple[ToolCall, ...] = (), tokens: int = 1
    ) -> None:
        self.text = text
        self.reasoning = reasoning
        self.tool_calls = tool_calls
        self.tokens = tokens


class _Plan:
    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self.output_tokens: list[str] = []
        self.finish_reason: FinishReason = "stop"
        self.stop_sequence: str | None = None


def _plan_output(request: GenerationRequest, prompt_tokens: Sequence[str], last_user: str) -> _Plan:
    """Decide the whole output up front; streaming then only paces it out."""
    seed = request.sampling.seed
    rng = random.Random(_digest(request.model, "\x01".join(prompt_tokens), repr(seed)))
    budget = request.sampling.max_tokens
    plan = _Plan()

    if request.model == SIM_LARGE and re.search(r"\bthink\b", last_user, re.IGNORECASE):
        n = rng.randint(4, 8)
        words = [rng.choice(_REASONING_WORDS) for _ in range(n)]
        for i, word in enumerate(words[:budget]):
            piece = word if i == 0 else " " + word
            plan.steps.append(_Step(reasoning=piece))
        budget -= min(n, budget)
        if budget <= 0:
            plan.finish_reason = "length"
            return plan

    chosen = _chosen_tool(request, last_user)
    if chosen is not None:
        tool, given = chosen
        arguments = json.dumps(given if given is not None else _arguments_for(tool.parameters, rng))
        call_id = "call_" + _digest("call", request.request_id, tool.name, arguments).hex()[:24]
        call_tokens = tokenize(tool.name + " " + arguments)
        if len(call_tokens) > budget:
            # A real model would emit truncated JSON; we emit nothing rather than
            # invalid arguments, and still say why it stopped.
            plan.finish_reason = "length"
            return plan
        plan.steps.append(_Step(tool_calls=(ToolCall(call_id, tool.name, arguments),), tokens=len(call_tokens)))
        plan.output_tokens.extend(call_tokens)
        plan.finish_reason = "tool_calls"
        return plan

    natural = _natural_length(request, rng.randint(8, 48))
    pieces = _text_pieces(rng, natural)
    stops = [s for s in request.sampling.stop if s]
    text = ""
    emitted = 0
    for i, piece in enumerate(pieces):
        if i >= budget:
            plan.finish_reason = "length"
            break
        text += piece
        plan.output_tokens.append(piece.strip())
        hit = _first_stop(text, stops)
        if hit is not None:
            index, stop = hit
            plan.steps.append(_Step(text=text[emitted:index]))
            plan.stop_sequence = stop
            return plan
        # Hold back any tail that could be the start of a stop string, so the
        # client never sees text that a later token turns into a stop match.
        safe = len(text) - _held_back(text, stops)
        plan.steps.append(_Step(text=text[emitted:safe]))
        emitted = max(emitted, safe)
    if emitted < len(text) and plan.steps:
        last = plan.steps[-1]
        last.text += text[emitted:]
    return plan


def _natural_length(request: GenerationRequest, natural: int) -> int:
    """Where the answer would end on its own, moved as vLLM's `ignore_eos` / `min_tokens` move the end token."""
    s = request.sampling
    if s.ignore_eos:
        return s.max_tokens + 1  # never ends by itself: stops at the length limit
    return max(natural, min(s.min_tokens, s.max_tokens))


def _text_pieces(rng: random.Random, n: int) -> list[str]:
    pieces: list[str] = []
    capital = True
    for i in range(n):
        if i == n - 1:
            pieces.append(".")
            break
        if pieces and not capital and rng.random() < 0.12:
            punct = rng.choice(_PUNCT)
            pieces.append(punct)
            capital = punct == "."
            continue
        word = rng.choice(_VOCAB)
        if capital:
            word = word.capitalize()
            capital = False
        pieces.append(word if i == 0 else " " + word)
    return pieces


def _first_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index >= 0 and (best is None or index < best[0]):
            best = (index, stop)
    return best


def _held_back(text: str, stops: Sequence[str]) -> int:
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


# `@sim-call NAME` or `@sim-call NAME {...}` alone on a line (surrounding spaces allowed).
_SIM_CALL_RE = re.compile(r"^[ \t]*@sim-call[ \t]+(\S+)(?:[ \t]+(\{.*\}))?[ \t]*$", re.MULTILINE)


def sim_call_directive(text: str) -> tuple[str, dict[str, Any] | None] | None:
    """The first well-formed `@sim-call` directive in `text`: (tool name, arguments or None)."""
    for match in _SIM_CALL_RE.finditer(text):
        raw = match.group(2)
        if raw is None:
            return match.group(1), None
        try:
            args = json.loads(raw)
        except ValueError:
            continue
        if isinstance(args, dict):
            return match.group(1), args
    return None


def _chosen_tool(request: GenerationRequest, last_user: str) -> tuple[ToolSpec, dict[str, Any] | None] | None:
    """The tool to call and the arguments asked for by a directive (None: generate them), or no call."""
    tools = request.tools
    choice = request.tool_choice
    if not tools or choice == "none":
        return None
    directive = sim_call_directive(last_user)
    directed = None
    if directive is not None:
        tool = next((t for t in tools if t.name == directive[0]), None)
        if tool is not None:
            directed = (tool, directive[1])
    if isinstance(choice, dict):
        wanted = choice.get("name")
        if directed is not None and directed[0].name == wanted:
            return directed
        return next((t for t in tools if t.name == wanted), tools[0]), None
    if choice == "required":
        return directed if directed is not None else (tools[0], None)
    # A tool result is the model's cue to answer in words, not to call again.
    answering_tool = bool(request.messages) and request.messages[-1].role == "tool"
    if answering_tool:
        return None
    if directed is not None:
        return directed
    if re.search(r"\bweather\b", last_user, re.IGNORECASE):
        return next((t for t in tools if "weather" in t.name.lower()), tools[0]), None
    return None


def _arguments_for(schema: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    props = schema.get("properties")
    if not isinstance(props, dict):
        return {}
    args: dict[str, Any] = {}
    for name, prop in props.items():
        prop = prop if isinstance(prop, dict) else {}
        enum = prop.get("enum")
        kind = prop.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), None)
        if isinstance(enum, list) and enum:
            args[name] = enum[0]
        elif kind == "integer":
            args[name] = rng.randint(1, 100)
        elif kind == "number":
            args[name] = round(rng.uniform(0, 100), 1)
        elif kind == "boolean":
            args[name] = rng.random() < 0.5
        elif kind == "array":
            args[name] = []
        elif kind == "object":
            args[name] = {}
        else:
            args[name] = rng.choice(_VOCAB)
    return args
