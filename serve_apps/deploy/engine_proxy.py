"""`DeploymentEngine`: an `Engine` over a Ray Serve DeploymentHandle.

The gateway holds a mapping model id → Engine. Under uvicorn those are local
engines; under Ray Serve each is one of these, calling the model's
`ModelServer` deployment, so the gateway code is identical in both.

A model deployment may be at zero replicas (`autoscaling.min_replicas: 0`);
`DeploymentEngine.is_warm` / `ensure_ready` (the `Engine` lifecycle methods
an in-process engine leaves at their always-warm defaults) let the gateway
wait for a cold start before admission, and `ReplicaWatch` tells it how many
replicas each deployment has without ever putting a controller call on the
request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from ray import serve
from ray.exceptions import RayTaskError, TaskCancelledError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, RequestCancelledError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    EngineError,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ModelStarting,
    ToolSpec,
)

log = logging.getLogger("packserve.engine_proxy")

# Serve-side failures that happen before the replica ran anything: nothing was
# generated, so the request bar is refunded (EngineError before_first_token).
_NOT_STARTED = (BackPressureError, DeploymentUnavailableError)
# How often serve.status() is asked while some deployment may be at zero
# replicas (min_replicas 0) or has not answered `ready()` yet: it bounds how
# long a scale-down to zero goes unnoticed (and so how stale a warm flag is).
WATCH_POLL_S = 0.5
# Otherwise. serve.status() is not small: it rebuilds every deployment's config
# (pickling the request router class) in the gateway and costs the controller
# too, so polling it twice a second took a large share of the gateway's CPU
# under load for deployments that never scale to zero (docs/performance.md).
WATCH_IDLE_POLL_S = 10.0
# While a dispatched request waits for its first chunk, how often it checks
# whether its deployment went to zero replicas (ModelStarting).
COLD_DISPATCH_CHECK_S = 0.25
# Counts older than this (controller unreachable) are "unknown", not "warm".
WATCH_STALE_S = 3 * WATCH_IDLE_POLL_S


class ReplicaWatch:
    """Running replicas per deployment of one Serve application, from `serve.status()`.

    `serve.status()` blocks on the Serve controller, so it runs in a worker
    thread on a background loop; readers get the last answer at once.
    """

    def __init__(self, app_name: str, *, poll_s: float = WATCH_POLL_S, idle_poll_s: float = WATCH_IDLE_POLL_S,
                 status: Callable[[], Any] = serve.status) -> None:
        self.app_name = app_name
        self.poll_s = poll_s
        self.idle_poll_s = max(idle_poll_s, poll_s)
        self._status = status
        self._running: dict[str, int] = {}
        self._updated: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._close: list[Callable[[], bool]] = []
        self.polls = 0

    def watch_closely(self, needed: Callable[[], bool]) -> None:
        """Poll every `poll_s` (instead of `idle_poll_s`) while `needed()` is true for any registrant."""
        self._close.append(needed)

    def interval(self) -> float:
        """The current polling interval."""
        return self.poll_s if any(needed() for needed in self._close) else self.idle_poll_s

    def start(self) -> None:
        """Start polling on the running loop (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._poll())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def running(self, deployment: str) -> int | None:
        """RUNNING replicas of `deployment` at the last poll; None before the first one or when stale."""
        if self._updated is None or time.monotonic() - self._updated > WATCH_STALE_S:
            return None
        return self._running.get(deployment, 0)

    def counter(self, deployment: str) -> Callable[[], int | None]:
        return lambda: self.running(deployment)

    async def refresh(self) -> None:
        status = await asyncio.to_thread(self._status)
        app = status.applications.get(self.app_name)
        counts: dict[str, int] = {}
        if app is not None:
            for name, deployment in app.deployments.items():
                # ReplicaState is a str enum: compares equal to its value.
                counts[name] = sum(n for state, n in deployment.replica_states.items() if state == "RUNNING")
        self._running = counts
        self._updated = time.monotonic()
        self.polls += 1

    async def _poll(self) -> None:
        last = -float("inf")
        while True:
            # Re-evaluated every poll_s, so a deployment that starts needing a
            # close watch (a replica died, a cold start began) gets it within poll_s.
            if time.monotonic() - last >= self.interval():
                last = time.monotonic()
                try:
                    await self.refresh()
                except Exception as exc:
                    # Transient (controller restarting): keep the last counts until they go stale.
                    log.warning("serve.status() failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.poll_s)


class DeploymentEngine(Engine):
    """An `Engine` whose work runs in a model deployment's replicas.

    Cancellation is the abort path: the gateway cancels or closes this
    generator when its client disconnects, and the `finally` below cancels
    the remote generator, which cancels `ModelServer.generate` in whichever
    replica runs it (an `abort(request_id)` call could land on another
    replica, so it is mapped to the same cancel).
    """

    def __init__(self, handle: DeploymentHandle[Any], cards: list[ModelCard],
                 running: Callable[[], int | None] | None = None, check_s: float = COLD_DISPATCH_CHECK_S) -> None:
        """`running` says how many replicas the deployment has (None: unknown), e.g. `ReplicaWatch.counter`.

        `check_s`: how often a request waiting for its first chunk looks at that count.
        """
        self._handle = handle
        self._stream = handle.options(stream=True)
        self._cards = list(cards)
        self._running: dict[str, DeploymentResponseGenerator[GenerationChunk]] = {}
        self._replicas = running
        self._check_s = check_s
        # How many times a waiting request has looked at the replica count (observable progress).
        self.dispatch_checks = 0
        # True once a replica answered `ready()` (engine loaded) and until the
        # deployment is seen at zero replicas again.
        self._confirmed = False
        self._starting: asyncio.Task[bool] | None = None

    def cards(self) -> list[ModelCard]:
        return list(self._cards)

    # -- cold starts ------------------------------------------------------------

    def settled(self) -> bool:
        """A replica answered `ready()` and the deployment has not been seen at zero since.

        Asking also confirms a replica Ray reports running in the background
        (as `is_warm` does), so a model nobody has called yet still settles.
        """
        return self.is_warm("")

    def is_warm(self, model: str) -> bool:
        """A replica is up and has answered `ready()`; never waits.

        A replica Ray reports running but this gateway has not heard from yet
        (the gateway just started, or another caller warmed it) is asked in
        the background, so the flag turns true without a request paying for it.
        """
        replicas = self._replicas() if self._replicas is not None else None
        if replicas == 0:
            self._confirmed = False
            return False
        if replicas and not self._confirmed:
            self._start()
        return self._confirmed

    async def ensure_ready(self, model: str, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for a ready replica, starting one if the deployment is at zero.

        The start is shared by every waiter and outlives them: a request that
        gives up (timeout, client gone) leaves the replica starting for the
        next one. `timeout_s <= 0` only starts it and says whether it was warm.
        """
        if self.is_warm(model):
            return True
        task = self._start()
        if timeout_s <= 0:
            return False
        try:
            return await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except TimeoutError:
            return False

    def _start(self) -> asyncio.Task[bool]:
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._ready())
        return self._starting

    async def _ready(self) -> bool:
        # A call to a deployment at zero replicas is what makes Ray scale it up
        # (the handle reports the queued call to the controller at once), and
        # `ready()` returns only once the engine has loaded.
        try:
            await self._handle.ready.remote()
        except Exception as exc:
            log.warning("model deployment did not become ready", extra={"error": repr(exc)})
            return False
        self._confirmed = True
        return True

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        remote = cast(DeploymentResponseGenerator[GenerationChunk], self._stream.generate.remote(request))
        self._running[request.request_id] = remote
        first = True
        done = False
        try:
            while True:
                try:
                    chunk = await (self._first_chunk(remote) if first else remote.__anext__())
                except StopAsyncIteration:
                    break
                except ModelStarting:
                    raise
                except Exception as exc:
                    raise _engine_error(exc, before_first_token=first) from None
                first = False
                yield chunk
            done = True
        finally:
            self._running.pop(request.request_id, None)
            if not done:
                remote.cancel()  # type: ignore[no-untyped-call]

    async def _first_chunk(self, remote: DeploymentResponseGenerator[GenerationChunk]) -> GenerationChunk:
        """The first chunk, or ModelStarting once the deployment is seen at zero replicas meanwhile.

        The gateway checks `is_warm` before admission, but the flag can be up
        to one ReplicaWatch poll stale: a request dispatched just after a
        scale-down to zero would sit in Ray's queue for a whole cold start
        holding a concurrency slot. Seeing zero replicas here hands it back.
        """
        replicas = self._replicas
        if replicas is None:
            # No replica counts to check (a handle used without a ReplicaWatch): no polling task either.
            return await remote.__anext__()
        nxt: asyncio.Future[GenerationChunk] = asyncio.ensure_future(remote.__anext__())
        try:
            while True:
                done, _ = await asyncio.wait({nxt}, timeout=self._check_s)
                if done:
                    return nxt.result()
                self.dispatch_checks += 1
                if replicas() == 0:
                    self._confirmed = False
                    raise ModelStarting()
        finally:
            if not nxt.done():
                nxt.cancel()

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        try:
            result: EmbeddingResult = await self._handle.embed.remote(request)
        except Exception as exc:
            raise _engine_error(exc, before_first_token=True) from None
        return result

    async def count_tokens(self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None,
                           tools: tuple[ToolSpec, ...]) -> int:
        try:
            count: int = await self._handle.count_tokens.remote(model, messages, prompt, tools)
        except Exception as exc:
            raise _engine_error(exc, before_first_token=True) from None
        return count

    async def abort(self, request_id: str) -> None:
        remote = self._running.pop(request_id, None)
        if remote is not None:
            remote.cancel()  # type: ignore[no-untyped-call]

    async def stats(self) -> dict[str, Any]:
        """The model deployment's counters (from one replica: the one the router picks)."""
        result: dict[str, Any] = await self._handle.stats.remote()
        return result


def _engine_error(exc: BaseException, *, before_first_token: bool) -> BaseException:
    """Map a Ray-side failure to what the gateway understands; user-code errors keep their type."""
    cause: BaseException = exc
    if isinstance(exc, RayTaskError):
        cause = exc.cause if isinstance(exc.cause, BaseException) else exc
    if isinstance(cause, EngineError):
        # A fresh copy, rebuilt as it crossed the Ray boundary, so subclasses keep their
        # type (PromptTooLong and RequestRejected are the gateway's 400s, not 502s).
        rebuild, args = cause.__reduce__()[:2]
        return cast(BaseException, rebuild(*args))
    if isinstance(cause, KeyError):
        # An id the replica's engine does not serve (engines.errors.UnknownModel, a KeyError; a bare one is
        # read the same way): the gateway answers 404 model_not_found.
        return UnknownModel(str(cause.args[0]) if cause.args else "")
    if isinstance(cause, asyncio.CancelledError | RequestCancelledError | TaskCancelledError):
        return asyncio.CancelledError()
    if isinstance(cause, _NOT_STARTED):
        return EngineError(f"the model deployment is unavailable: {type(cause).__name__}", before_first_token=True)
    return EngineError(f"model replica failed: {type(cause).__name__}", before_first_token=before_first_token)
