"""The protocol-neutral core of every metered request.

auth → model → admission (queueing) → wait for model capacity → dispatch →
settlement, shared by the OpenAI and Anthropic routes, streaming or not, so
there is exactly one settlement path for every kind of response (no "$0 for
streams" bugs).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from starlette.requests import Request

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
from serve_apps.gateway.auth_guard import AuthFailureGuard
from serve_apps.gateway.errors import ApiError, UnknownModel, model_not_found, not_served, store_unavailable
from serve_apps.gateway.metrics import Metrics
from serve_apps.gateway.recent import RecentWindow
from serve_apps.protocols.common import GenerationResult

log = logging.getLogger("packserve.gateway")

T = TypeVar("T")
# What a request that has not started generating owes, checkpointed while it waits or embeds.
NOTHING_YET = Progress(0, 0, 0, False, None)
DEFAULT_COLD_START_TIMEOUT_S = 600.0
# After a cold-start timeout the replica keeps starting; this is when to come back.
COLD_START_RETRY_AFTER_S = 30
QUEUE_MS_HEADER = "x-packserve-queue-ms"


@dataclass(frozen=True)
class Dispatched:
    """An admitted generation that has produced its first chunk (None: it produced nothing)."""

    ticket: Ticket
    first: GenerationChunk | None
    chunks: AsyncIterator[GenerationChunk]


def prompt_too_long(exc: PromptTooLong, protocol: str, param: str) -> ApiError:
    """A 400 worded as each provider words it: coding agents match these texts to compact their history."""
    if protocol == "anthropic":
        return ApiError(400, f"prompt is too long: {exc.prompt_tokens} tokens > {exc.limit} maximum",
                        "context_length_exceeded")
    if protocol == "responses":
        return ApiError(400, f"Your input exceeds the context window of this model ({exc.prompt_tokens} tokens > "
                             f"{exc.limit}). Please adjust your input and try again.", "context_length_exceeded",
                        "input")
    return ApiError(400, f"This model's maximum context length is {exc.limit} tokens. However, your "
                         f"{param} resulted in {exc.prompt_tokens} tokens. "
                         f"Please reduce the length of the {param}.", "context_length_exceeded", param)


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
        self.cold_start_timeout = cold_start_timeout or (lambda _model: DEFAULT_COLD_START_TIMEOUT_S)
        self.cold_starts_waiting = 0
        # Requests waiting for each model's cold start: a cold model with waiters is starting.
        self.starting: collections.Counter[str] = collections.Counter()
        self._closers: set[asyncio.Task[None]] = set()

    # -- steps ----------------------------------------------------------------

    async def authenticate(self, request: Request) -> Principal:
        try:
            principal = await self.accounts.authenticate(presented_key(request))
        except AuthError as exc:
            if self.auth_guard is not None:
                raise await self.auth_guard.failed(request, str(exc)) from None
            raise ApiError(401, str(exc), "invalid_api_key") from None
        except StoreError as exc:
            log.error("store unavailable during auth", extra={"error": str(exc)})
            raise store_unavailable() from None
        # Read by the gateway's rejection log: a request refused later still names its account.
        request.state.account_id = principal.account.id
        return principal

    def resolve(self, model: str, *, kind: str) -> ModelCard:
        card = self.cards.get(model)
        if card is None:
            raise model_not_found(model)
        kinds = {"chat": ("chat", "lora"), "embeddings": ("embeddings",)}[kind]
        if card.kind not in kinds:
            raise ApiError(400, f"The model '{model}' is a {card.kind} model and cannot serve this endpoint.",
                           "model_not_supported", "model")
        return card

    def engine(self, card: ModelCard) -> Engine:
        return self.engines[card.id]

    def is_warm(self, card: ModelCard) -> bool:
        is_warm = getattr(self.engine(card), "is_warm", None)
        return True if is_warm is None else bool(is_warm(card.id))

    async def start_model(self, model: str) -> bool | None:
        """Start `model` ahead of traffic: True if it was warm already, False if starting, None if unknown."""
        card = self.cards.get(model)
        if card is None:
            return None
        ensure = getattr(self.engine(card), "ensure_ready", None)
        return True if ensure is None else bool(await ensure(card.id, 0))

    async def wait_ready(self, request: Request, card: ModelCard) -> None:
        """Wait for a cold model before admission: the wait is never charged and holds no slot or queue place."""
        ensure = getattr(self.engine(card), "ensure_ready", None)
        if ensure is None or self.is_warm(card):
            return
        timeout_s = self.cold_start_timeout(card.id)
        started = time.monotonic()
        self.cold_starts_waiting += 1
        self.starting[card.id] += 1
        try:
            ready = await _unless_disconnected(request, ensure(card.id, timeout_s))
        finally:
            self.cold_starts_waiting -= 1
            self.starting[card.id] -= 1
        waited_s = time.monotonic() - started
        outcome = "client_closed" if ready is None else "ready" if ready else "timeout"
        self.metrics.cold_start_wait.labels(card.id, outcome).observe(waited_s)
        log.info("cold start wait", extra={"model": card.id, "ready": ready, "waited_ms": int(waited_s * 1000)})
        if ready is None:
            raise ApiError(499, "client closed the request while the model was starting", "client_closed")
        if not ready:
            raise ApiError(503, f"The model '{card.id}' is starting from zero replicas and was not ready within "
                                f"{timeout_s:g} s; it keeps starting, retry in {COLD_START_RETRY_AFTER_S} s.",
                           "model_cold_start_timeout", headers={"retry-after": str(COLD_START_RETRY_AFTER_S)})

    async def admit(self, request: Request, principal: Principal, card: ModelCard) -> Ticket:
        """Wait out a cold start, then reserve a slot, waiting in the account's queue; give up if the client leaves."""
        denied = check_key_access(principal.key, card.id, time.time_ns() // 1_000_000)
        if denied is not None:
            self.recent.refused(principal.account.id, principal.key.id, card.id, denied.code, denied.status)
            raise ApiError(denied.status, denied.message, denied.code, "model" if denied.code == "model_not_allowed"
                           else None)
        await self.wait_ready(request, card)
        started = time.monotonic()
        reserve = asyncio.ensure_future(self.controller.reserve(principal.account, principal.key.id, card.id))
        gone = asyncio.ensure_future(_disconnected(request))
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
            raise ApiError(499, "client closed the request while it was queued", "client_closed")
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
            raise ApiError(401, "invalid API key", "invalid_api_key") from None
        except StoreError as exc:
            log.error("store unavailable during admission", extra={"error": str(exc)})
            raise store_unavailable() from None
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
                                529 if protocol == "anthropic" else 503)
            log.info("refused as overloaded", extra={"model": model, "account": ticket.account.id,
                                                     "waited_ms": int(waited_s * 1000)})
            headers = {**quota_headers(ticket.snapshot, self.unit), "retry-after": str(exc.retry_after_s),
                       QUEUE_MS_HEADER: str(int(waited_s * 1000))}
            # Anthropic's overload status is 529 (its SDK retries it); OpenAI's is 503 with Retry-After.
            raise ApiError(529 if protocol == "anthropic" else 503,
                           f"The model '{card.id}' is at capacity and no sequence freed up within "
                           f"{self.scheduler.timeout_s:g} s; this request was not charged. Retry after "
                           f"{exc.retry_after_s} s.", "overloaded", headers=headers) from None
        except StoreError as exc:
            self._unserved(ticket, "error")  # never dispatched: refunded like a failure before the first token
            log.error("store unavailable while waiting for capacity", extra={"error": str(exc)})
            raise store_unavailable() from None
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
        gone = asyncio.ensure_future(_disconnected(request))
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
        raise ApiError(499, "client closed the request while it waited for the model", "client_closed")

    def _unserved(self, ticket: Ticket, status: str) -> None:
        self.controller.settle(ticket, prompt_tokens=0, cached_tokens=0, completion_tokens=0, status=status,
                               first_token=False, ttft_ms=None)

    async def dispatch(self, request: Request, principal: Principal, card: ModelCard, gen: GenerationRequest,
                       protocol: str) -> Dispatched:
        """Admit, start the generation and pull its first chunk (an engine failure here is an HTTP error).

        A dispatch that finds the model gone to zero replicas after admission
        (ModelStarting: its warm flag was up to one watch poll stale) has
        already been settled as refunded with its slot freed by `metered`;
        it goes back through `admit`, which now waits out the cold start
        uncharged, and is dispatched once more.
        """
        for attempt in range(2):
            ticket = await self.admit(request, principal, card)
            await self.wait_for_capacity(request, ticket, card, protocol)
            chunks = self.metered(ticket, gen, protocol)
            try:
                first: GenerationChunk | None = await chunks.__anext__()
            except StopAsyncIteration:
                first = None
            except ModelStarting:
                self.metrics.cold_redispatches.labels(card.id).inc()
                log.info("model at zero replicas after admission; waiting for it uncharged",
                         extra={"request_id": gen.request_id, "model": card.id, "attempt": attempt})
                continue
            except PromptTooLong as exc:
                log.info("prompt longer than the model's context", extra={
                    "request_id": gen.request_id, "model": card.id, "prompt_tokens": exc.prompt_tokens,
                    "limit": exc.limit})
                raise prompt_too_long(exc, protocol, "prompt" if gen.prompt is not None else "messages") from None
            except RequestRejected as exc:
                # Not the reason: it can quote the request (a schema), and logs never hold request content.
                log.info("request rejected by the engine", extra={"request_id": gen.request_id, "model": card.id})
                raise ApiError(400, f"The model cannot serve this request: {exc}", "invalid_request") from None
            except UnknownModel as exc:
                # The catalog has the id but the replica reached does not (one built from another catalog).
                log.warning("model not served by its engine", extra={"request_id": gen.request_id, "model": exc.model})
                raise not_served(exc) from None
            except EngineError as exc:
                log.warning("engine failed before the first token", extra={"error": str(exc)})
                raise ApiError(502, "The model failed before producing output; this request was not charged.",
                               "engine_error") from None
            return Dispatched(ticket, first, chunks)
        raise ApiError(503, f"The model '{card.id}' went to zero replicas twice while this request was "
                            f"dispatched; retry in {COLD_START_RETRY_AFTER_S} s.", "model_cold_start_timeout",
                       headers={"retry-after": str(COLD_START_RETRY_AFTER_S)})

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
            async with self.controller.renewing(ticket, progress), self._holding(ticket, service):
                async for chunk in agen:
                    if chunk.usage is not None:
                        usage = chunk.usage
                    if not first_token and (chunk.text or chunk.reasoning or chunk.tool_calls):
                        first_token = True
                        ttft_ms = int((time.monotonic() - started) * 1000)
                        self.metrics.ttft.labels(request.model).observe(ttft_ms / 1000)
                        self.recent.first_token(request.model, ttft_ms)
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
    async def collect_from(dispatched: Dispatched) -> GenerationResult:
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


async def _abort(engine: Engine, agen: AsyncIterator[GenerationChunk], request_id: str) -> None:
    with contextlib.suppress(Exception):
        await engine.abort(request_id)
    aclose = getattr(agen, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | None:
    """`work`'s result, or None (with `work` cancelled) if the client goes away first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        return None
    return task.result()


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def new_request_id(prefix: str, sep: str = "-") -> str:
    """OpenAI ids look like `chatcmpl-…`, Anthropic ones like `msg_…`."""
    return f"{prefix}{sep}{uuid.uuid4().hex[:24]}"
