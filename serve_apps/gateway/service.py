"""The protocol-neutral core of every metered request: one story, whichever API it came through.

`GatewayService.generate` reads top to bottom as auth → model → cold start →
admit → wait for capacity → dispatch → stream → settle; `embeddings` is the
same story without the capacity wait and the stream. The OpenAI, Anthropic
and Responses routes each call one of them once, so there is exactly one
settlement path for every kind of response (no "$0 for streams" bugs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from cluster.accounts import Accounts, AuthError, Principal
from cluster.controller import AdmissionController, AdmissionRefused, Progress, Ticket
from cluster.key_limits import check_key_access
from cluster.quotas import quota_headers
from cluster.refusals import key_cap_message
from cluster.scheduler import CapacityAttempt, CapacityHold, Overloaded, Scheduler
from cluster.store import NotFound, StoreError
from policies.admission import Reason
from policies.fairness import service_units
from serve_apps.engines.types import (
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ModelStarting,
    PromptTooLong,
    RequestRejected,
    TokenUsage,
)
from serve_apps.gateway import errors
from serve_apps.gateway.auth_guard import AuthFailureGuard
from serve_apps.gateway.calls import EmbeddingCall, GenerationCall, TokenCountCall
from serve_apps.gateway.cold_start import ColdStarts
from serve_apps.gateway.disconnect import disconnected
from serve_apps.gateway.errors import ApiError, UnknownModel
from serve_apps.gateway.metrics import Metrics
from serve_apps.gateway.recent import RecentWindow
from serve_apps.gateway.streaming import sse_response
from serve_apps.protocols.common import GenerationResult, InvalidRequest

log = logging.getLogger("packserve.gateway")

C = TypeVar("C")
# What a request that has not started generating owes, checkpointed while it waits or embeds.
NOTHING_YET = Progress(0, 0, 0, False, None)
# A dispatch that finds its model gone to zero replicas waits for the cold start and goes again, once.
DISPATCHES = 2
QUEUE_MS_HEADER = "x-packserve-queue-ms"


@dataclass(frozen=True)
class Dispatched:
    """An admitted generation that has produced its first chunk (None: it produced nothing)."""

    ticket: Ticket
    first: GenerationChunk | None
    chunks: AsyncIterator[GenerationChunk]


def presented_key(request: Request) -> str | None:
    """`x-api-key` (Anthropic) or `Authorization: Bearer` (both)."""
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


class GatewayService:
    # Set by the app: counts invalid keys per source address (None: every failure is a plain 401).
    auth_guard: AuthFailureGuard | None = None

    def __init__(self, controller: AdmissionController, accounts: Accounts, engines: Mapping[str, Engine],
                 cards: Mapping[str, ModelCard], metrics: Metrics,
                 cold_start_timeout: Callable[[str], float] | None = None,
                 scheduler: Scheduler | None = None, recent: RecentWindow | None = None) -> None:
        self.controller = controller
        self.recent = recent or RecentWindow(lambda: time.time_ns() // 1_000_000)
        self.scheduler = scheduler
        self.accounts = accounts
        self.engines = dict(engines)
        self.cards = dict(cards)
        self.metrics = metrics
        self.unit = controller.policy.unit
        self.cold_starts = ColdStarts(self.engines, self.cards, metrics, cold_start_timeout)
        self._closers: set[asyncio.Task[None]] = set()

    # -- the stories ------------------------------------------------------------

    async def generate(self, request: Request, protocol: str, read: Callable[[], Awaitable[GenerationCall]], *,
                       authenticate_first: bool = False) -> Response:
        """One generation: auth → model → cold start → admit → wait for capacity → dispatch → stream → settle.

        `read` parses the body (after the key, with `authenticate_first`: Anthropic's order). A dispatch
        that finds the model gone to zero replicas after admission (its warm flag was up to one watch
        poll stale) was settled as refunded with its slot freed; it goes round once more, now waiting
        out the cold start uncharged.
        """
        principal, call = await self._authenticated(request, read, authenticate_first)
        card = self.resolve(call.model, kind="chat")
        gen = _converted(lambda: call.generation(card))
        dispatched: Dispatched | None = None
        for attempt in range(DISPATCHES):
            self._check_key(principal, card)
            await self.cold_starts.wait(request, card)
            ticket = await self.admit(request, principal, card)
            await self.wait_for_capacity(request, ticket, card, protocol)
            dispatched = await self.dispatch(ticket, gen, protocol, attempt)
            if dispatched is not None:
                break
        if dispatched is None:
            raise errors.cold_twice(card.id)
        headers = self.headers(dispatched.ticket)
        created = int(time.time())
        if call.stream:
            # Settled when the stream ends, however it ends (`metered`).
            return sse_response(dispatched.first, dispatched.chunks, call.events(created), headers)
        try:
            result = await self.collect(dispatched)
        except EngineError:
            raise errors.failed_while_generating() from None
        return JSONResponse(call.answer(result, created), headers=headers)

    async def embeddings(self, request: Request, protocol: str,
                         read: Callable[[], Awaitable[EmbeddingCall]]) -> Response:
        """auth → model → cold start → admit → embed → settle."""
        principal, call = await self._authenticated(request, read, False)
        card = self.resolve(call.model, kind="embeddings")
        embedding = _converted(call.embedding)
        self._check_key(principal, card)
        await self.cold_starts.wait(request, card)
        ticket = await self.admit(request, principal, card)
        headers = self.headers(ticket)
        try:
            result = await self.embed(ticket, embedding, protocol)
        except EngineError:
            raise errors.embeddings_failed() from None
        return JSONResponse(call.answer(result), headers=headers)

    async def count_tokens(self, request: Request, read: Callable[[], Awaitable[TokenCountCall]]) -> int:
        """auth → model → count: free, neither bar is charged and no slot is taken."""
        _, call = await self._authenticated(request, read, True)
        card = self.resolve(call.model, kind="chat")
        messages, tools = _converted(call.prompt)
        return await self.engine(card).count_tokens(card.id, messages, None, tools)

    # -- steps ------------------------------------------------------------------

    async def _authenticated(self, request: Request, read: Callable[[], Awaitable[C]],
                             authenticate_first: bool) -> tuple[Principal, C]:
        if authenticate_first:
            # As Anthropic does, so a refused body is logged under its account.
            principal = await self.authenticate(request)
            return principal, await read()
        call = await read()
        return await self.authenticate(request), call

    async def authenticate(self, request: Request) -> Principal:
        try:
            principal = await self.accounts.authenticate(presented_key(request))
        except AuthError as exc:
            if self.auth_guard is not None:
                raise await self.auth_guard.failed(request, str(exc)) from None
            raise errors.invalid_api_key(str(exc)) from None
        except StoreError as exc:
            log.error("store unavailable during auth", extra={"error": str(exc)})
            raise errors.store_unavailable() from None
        # Read by the gateway's rejection log: a request refused later still names its account.
        request.state.account_id = principal.account.id
        return principal

    def resolve(self, model: str, *, kind: str) -> ModelCard:
        card = self.cards.get(model)
        if card is None:
            raise errors.model_not_found(model)
        kinds = {"chat": ("chat", "lora"), "embeddings": ("embeddings",)}[kind]
        if card.kind not in kinds:
            raise errors.wrong_kind(model, card.kind)
        return card

    def engine(self, card: ModelCard) -> Engine:
        return self.engines[card.id]

    def _check_key(self, principal: Principal, card: ModelCard) -> None:
        """The key may be disabled, expired or limited to other models."""
        refusal = check_key_access(principal.key, card.id, time.time_ns() // 1_000_000)
        if refusal is not None:
            self.recent.refused(principal.account.id, principal.key.id, card.id, refusal.code, refusal.status)
            raise errors.key_refused(refusal)

    async def admit(self, request: Request, principal: Principal, card: ModelCard) -> Ticket:
        """Reserve a slot, waiting in the account's queue; give up if the client leaves."""
        started = time.monotonic()
        reserve = asyncio.ensure_future(self.controller.reserve(principal.account, principal.key.id, card.id))
        gone = asyncio.ensure_future(disconnected(request))
        try:
            done, _ = await asyncio.wait({reserve, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if reserve not in done:
            reserve.cancel()
            with contextlib.suppress(asyncio.CancelledError, AdmissionRefused, StoreError, NotFound):
                ticket = await reserve
                # Admitted in the same instant the client left: give the slot straight back.
                self.controller.settle(ticket, prompt_tokens=0, cached_tokens=0, completion_tokens=0,
                                       status="aborted", first_token=False, ttft_ms=None)
            raise errors.client_closed("while it was queued")
        try:
            ticket = reserve.result()
        except AdmissionRefused as refused:
            self.metrics.refusals.labels(refused.reason.value).inc()
            headers = quota_headers(refused.snapshot, self.unit) if refused.snapshot else {}
            if refused.retry_after_s is not None:
                headers["retry-after"] = str(refused.retry_after_s)
            status = 403 if refused.reason is Reason.ACCOUNT_SUSPENDED else 429
            self.recent.refused(principal.account.id, principal.key.id, card.id, refused.reason.value, status)
            message = str(refused)
            if refused.reason in (Reason.KEY_REQUEST_CAP_REACHED, Reason.KEY_WEEKLY_CAP_REACHED):
                message = key_cap_message(refused.reason, principal.key, refused.snapshot,
                                          self.controller.settings.dashboard_url)
            raise ApiError(status, message, refused.reason.value, headers=headers) from None
        except NotFound:
            raise errors.invalid_api_key() from None
        except StoreError as exc:
            log.error("store unavailable during admission", extra={"error": str(exc)})
            raise errors.store_unavailable() from None
        if ticket.queued_s > 0.001:
            self.metrics.queue_wait.observe(time.monotonic() - started)
        return ticket

    def headers(self, ticket: Ticket) -> dict[str, str]:
        headers = quota_headers(ticket.snapshot, self.unit)
        headers[QUEUE_MS_HEADER] = str(int(ticket.capacity_wait_s * 1000))
        return headers

    async def wait_for_capacity(self, request: Request, ticket: Ticket, card: ModelCard, protocol: str) -> None:
        """Wait for a free sequence of the model (SPEC §4); past the bound, refuse as overloaded, uncharged.

        The slot lease is renewed meanwhile. A refusal or a client that hangs up
        settles the ticket as unserved: its request-bar charge comes back and its
        slot is freed. Sets `ticket.capacity` (released when the response settles).
        """
        if self.scheduler is None:
            return
        model = card.base_model or card.id  # a LoRA adapter runs on its base model's sequences
        attempt = self.scheduler.attempt(ticket.account, model)
        if attempt is None:
            return
        started = time.monotonic()
        try:
            # The common case, a free sequence, is this one store step.
            hold = await attempt.try_now()
            if hold is None:
                hold = await self._wait_queued(request, ticket, attempt, model)
        except Overloaded as exc:
            waited_s = time.monotonic() - started
            self._unserved(ticket, "overloaded")
            self.metrics.capacity_wait.labels(model, "overloaded").observe(waited_s)
            self.metrics.overloaded.labels(model).inc()
            self.recent.refused(ticket.account.id, ticket.key_id, card.id, "overloaded",
                                errors.overloaded_status(protocol))
            log.info("refused as overloaded", extra={"model": model, "account": ticket.account.id,
                                                     "waited_ms": int(waited_s * 1000)})
            headers = {**quota_headers(ticket.snapshot, self.unit), "retry-after": str(exc.retry_after_s),
                       QUEUE_MS_HEADER: str(int(waited_s * 1000))}
            raise errors.overloaded(card.id, protocol, self.scheduler.timeout_s, exc.retry_after_s,
                                    headers) from None
        except StoreError as exc:
            self._unserved(ticket, "error")  # never dispatched: refunded like a failure before the first token
            log.error("store unavailable while waiting for capacity", extra={"error": str(exc)})
            raise errors.store_unavailable() from None
        ticket.capacity = hold
        ticket.capacity_wait_s = hold.waited_s
        self.metrics.capacity_wait.labels(model, "dispatched").observe(hold.waited_s)
        self.recent.waited(model, int(hold.waited_s * 1000))

    async def _wait_queued(self, request: Request, ticket: Ticket, attempt: CapacityAttempt,
                           model: str) -> CapacityHold:
        """The queued case: wait, renewing the slot lease, unless the client hangs up first.

        The wait is checkpointed like a stream with nothing generated yet: if
        this process dies while the request waits, another gateway's sweep
        settles it (request-bar charge refunded, a usage record kept).
        """
        assert self.scheduler is not None
        waiting = asyncio.ensure_future(attempt.wait())
        gone = asyncio.ensure_future(disconnected(request))
        try:
            async with self.controller.renewing(ticket, lambda: NOTHING_YET):
                done, _ = await asyncio.wait({waiting, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if waiting in done:
            return waiting.result()
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError, Overloaded, StoreError):
            # Dispatched in the same instant the client left: give the sequence straight back.
            self.scheduler.release(await waiting, 0)
        self._unserved(ticket, "client_closed")
        self.metrics.capacity_wait.labels(model, "client_closed").observe(attempt.waited_s())
        raise errors.client_closed("while it waited for the model")

    def _unserved(self, ticket: Ticket, status: str) -> None:
        self.controller.settle(ticket, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status=status,
                               first_token=False, ttft_ms=None)

    async def dispatch(self, ticket: Ticket, gen: GenerationRequest, protocol: str,
                       attempt: int) -> Dispatched | None:
        """Start the generation and pull its first chunk: an engine failure here is an HTTP error.

        None: the model's deployment was found at zero replicas (ModelStarting), and `metered` has
        settled the ticket as refunded with its slot freed.
        """
        hold = ticket.capacity
        gen = replace(gen, owner=ticket.account.id, preempt=hold.preempt if hold is not None else None)
        if gen.preempt is not None:
            self.metrics.preemptions.labels(gen.model).inc()
        chunks = self.metered(ticket, gen, protocol)
        try:
            first: GenerationChunk | None = await chunks.__anext__()
        except StopAsyncIteration:
            first = None
        except ModelStarting:
            self.metrics.cold_redispatches.labels(gen.model).inc()
            log.info("model at zero replicas after admission; waiting for it uncharged",
                     extra={"request_id": gen.request_id, "model": gen.model, "attempt": attempt})
            return None
        except PromptTooLong as exc:
            log.info("prompt longer than the model's context", extra={
                "request_id": gen.request_id, "model": gen.model, "prompt_tokens": exc.prompt_tokens,
                "limit": exc.limit})
            raise errors.prompt_too_long(exc, protocol, "prompt" if gen.prompt is not None else "messages") from None
        except RequestRejected as exc:
            # Not the reason: it can quote the request (a schema), and logs never hold request content.
            log.info("request rejected by the engine", extra={"request_id": gen.request_id, "model": gen.model})
            raise errors.rejected_by_engine(exc) from None
        except UnknownModel as exc:
            # The catalog has the id but the replica reached does not (one built from another catalog).
            log.warning("model not served by its engine", extra={"request_id": gen.request_id, "model": exc.model})
            raise errors.not_served(exc) from None
        except EngineError as exc:
            log.warning("engine failed before the first token", extra={"error": str(exc)})
            raise errors.failed_before_output() from None
        return Dispatched(ticket, first, chunks)

    # -- the metered stream ---------------------------------------------------

    async def metered(self, ticket: Ticket, request: GenerationRequest,
                      protocol: str) -> AsyncIterator[GenerationChunk]:
        """Yield the engine's chunks; settle exactly once however the stream ends.

        Settlement and the engine abort run in their own tasks: a disconnect
        cancels this generator, and any await in its `finally` would be
        cancelled too.
        """
        ticket.api = protocol
        engine = self.engine(self.cards[request.model])
        agen = engine.generate(request)
        usage = TokenUsage()
        first_token = False
        ttft_ms: int | None = None
        status = "aborted"
        started = time.monotonic()

        def progress() -> Progress:
            # What to charge if this process dies mid-stream (checkpointed at the start and each renewal).
            return Progress(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, first_token, ttft_ms)

        def service() -> int:
            # Grows the account's virtual token counter while it streams (SPEC §4).
            return service_units(usage.prompt_tokens, usage.completion_tokens)

        try:
            async with self.controller.renewing(ticket, progress) as checkpointed, self._holding(ticket, service):
                async for chunk in agen:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not first_token and (chunk.text or chunk.reasoning or chunk.tool_calls):
                        first_token = True
                        ttft_ms = int((time.monotonic() - started) * 1000)
                        self.metrics.ttft.labels(request.model).observe(ttft_ms / 1000)
                        self.recent.first_token(request.model, ttft_ms)
                    if not checkpointed.is_set():
                        # Usually written during the engine's prefill already; were this process killed
                        # right after the client saw a chunk, the record must be in the store.
                        await checkpointed.wait()
                    yield chunk
            status = "ok"
        except (EngineError, UnknownModel):
            status = "error"
            raise
        finally:
            if status != "ok":
                self._spawn(_abort(engine, agen, request.request_id))
            if self.scheduler is not None:
                self.scheduler.release(ticket.capacity, service())
            self.controller.settle(ticket, prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
                                   completion_tokens=usage.completion_tokens, status=status,
                                   first_token=first_token, ttft_ms=ttft_ms)
            self.metrics.observe_finished(request.model, protocol, status, usage)
            log.info("request finished", extra={
                "request_id": request.request_id, "account": ticket.account.id, "key": ticket.key_id,
                "model": request.model, "status": status, "prompt_tokens": usage.prompt_tokens,
                "cached_tokens": usage.cached_tokens, "completion_tokens": usage.completion_tokens,
                "ttft_ms": ttft_ms, "duration_ms": int((time.monotonic() - started) * 1000),
                "queued_ms": int(ticket.queued_s * 1000), "capacity_wait_ms": int(ticket.capacity_wait_s * 1000)})

    def _holding(self, ticket: Ticket, service: Callable[[], int]) -> contextlib.AbstractAsyncContextManager[None]:
        if self.scheduler is None:
            return contextlib.nullcontext()
        return self.scheduler.holding(ticket.capacity, service)

    @staticmethod
    async def collect(dispatched: Dispatched) -> GenerationResult:
        """Fold a whole (metered) generation for a non-streaming response."""
        result = GenerationResult()
        if dispatched.first is not None:
            result.add(dispatched.first)
        async for chunk in dispatched.chunks:
            result.add(chunk)
        return result

    async def embed(self, ticket: Ticket, request: EmbeddingRequest, protocol: str) -> EmbeddingResult:
        """Embeddings: same lease and settlement path as generations."""
        status = "error"
        prompt_tokens = 0
        ticket.api = protocol
        try:
            # Renewed and checkpointed like a stream: a gateway that dies meanwhile still leaves its usage record.
            async with self.controller.renewing(ticket, lambda: NOTHING_YET):
                result = await self.engine(self.cards[request.model]).embed(request)
            prompt_tokens = result.prompt_tokens
            status = "ok"
            return result
        finally:
            self.controller.settle(ticket, prompt_tokens=prompt_tokens, cached_tokens=0, completion_tokens=0,
                                   status=status, first_token=status == "ok", ttft_ms=None)
            self.metrics.observe_finished(request.model, protocol, status, TokenUsage(prompt_tokens=prompt_tokens))

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)


async def _abort(engine: Engine, agen: AsyncGenerator[GenerationChunk, None], request_id: str) -> None:
    with contextlib.suppress(Exception):
        await engine.abort(request_id)
    with contextlib.suppress(Exception):
        await agen.aclose()


def _converted(convert: Callable[[], C]) -> C:
    """The engine-neutral request of a call; what the converters refuse is the client's 400."""
    try:
        return convert()
    except InvalidRequest as exc:
        raise errors.invalid_request(exc) from None


def new_request_id(prefix: str, sep: str = "-") -> str:
    """OpenAI ids look like `chatcmpl-…`, Anthropic ones like `msg_…`."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"
