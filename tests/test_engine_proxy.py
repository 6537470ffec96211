"""DeploymentEngine and ReplicaWatch against fakes of the Ray handle and `serve.status()`.

The real Ray path is covered by tests/test_ray_scaling.py and
tests/test_ray_vllm.py; these pin the decisions that are awkward to provoke
there: a dispatch that finds its deployment at zero replicas, and how often
the watch asks the Serve controller.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest

from serve_apps.deploy.engine_proxy import DeploymentEngine, ReplicaWatch, _engine_error
from serve_apps.engines.types import (
    EngineError,
    GenerationChunk,
    GenerationRequest,
    ModelStarting,
    PromptTooLong,
    RequestRejected,
    SamplingParams,
)

MODEL = "hf:packserve/sim-large"


class FakeRemote:
    """A DeploymentResponseGenerator whose chunks the test feeds."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[GenerationChunk | None] = asyncio.Queue()
        self.cancelled = False

    def __aiter__(self) -> FakeRemote:
        return self

    async def __anext__(self) -> GenerationChunk:
        chunk = await self.queue.get()
        if chunk is None:
            raise StopAsyncIteration
        return chunk

    def cancel(self) -> None:
        self.cancelled = True


class FakeHandle:
    """Just enough of a DeploymentHandle: `options(stream=True).generate.remote(request)` and `ready.remote()`."""

    def __init__(self) -> None:
        self.remotes: list[FakeRemote] = []
        self.ready_calls = 0
        self.ready_event = asyncio.Event()

    def options(self, **_: Any) -> FakeHandle:
        return self

    @property
    def generate(self) -> SimpleNamespace:
        def remote(_request: GenerationRequest) -> FakeRemote:
            self.remotes.append(FakeRemote())
            return self.remotes[-1]

        return SimpleNamespace(remote=remote)

    @property
    def ready(self) -> SimpleNamespace:
        async def wait() -> list[str]:
            self.ready_calls += 1
            await self.ready_event.wait()
            return [MODEL]

        return SimpleNamespace(remote=wait)


def request() -> GenerationRequest:
    return GenerationRequest(request_id="r1", model=MODEL, sampling=SamplingParams(max_tokens=2), prompt="hi")


CHECK_S = 0.005  # the engine's dispatch check interval, injected short


def engine_with(replicas: list[int | None]) -> tuple[DeploymentEngine, FakeHandle]:
    handle = FakeHandle()
    engine = DeploymentEngine(handle, [], running=lambda: replicas[0], check_s=CHECK_S)  # type: ignore[arg-type]
    return engine, handle


async def until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    """Yield to the loop until `condition()` holds (progress is observed, not waited out by a fixed sleep)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition never held"
        await asyncio.sleep(CHECK_S / 5)


async def test_a_dispatch_that_finds_zero_replicas_raises_model_starting_and_cancels() -> None:
    replicas: list[int | None] = [1]
    engine, handle = engine_with(replicas)
    handle.ready_event.set()
    assert await engine.ensure_ready(MODEL, 1)
    assert engine.is_warm(MODEL)

    stream = engine.generate(request())
    first = asyncio.ensure_future(stream.__anext__())
    await until(lambda: engine.dispatch_checks >= 2)  # checked with replicas reported: keeps waiting
    assert not first.done()
    replicas[0] = 0  # the watch's next poll sees the scale-down to zero
    with pytest.raises(ModelStarting) as err:
        await asyncio.wait_for(first, 2)
    assert err.value.before_first_token
    assert handle.remotes[0].cancelled
    assert not engine.is_warm(MODEL)  # so the gateway waits for the cold start before admitting again


async def test_chunks_flow_and_replicas_going_to_zero_after_the_first_chunk_do_not_interrupt() -> None:
    replicas: list[int | None] = [1]
    engine, handle = engine_with(replicas)
    stream = engine.generate(request())
    first = asyncio.ensure_future(stream.__anext__())
    await asyncio.sleep(0)
    remote = handle.remotes[0]
    await remote.queue.put(GenerationChunk(text="a"))
    assert (await asyncio.wait_for(first, 2)).text == "a"
    replicas[0] = 0  # only the wait for the first chunk checks; a running stream is Ray's to finish
    await remote.queue.put(GenerationChunk(text="b"))
    await remote.queue.put(None)
    assert [c.text async for c in stream] == ["b"]
    assert not remote.cancelled


async def test_unknown_replica_counts_never_raise_model_starting() -> None:
    engine, handle = engine_with([None])  # the watch has no answer (controller unreachable)
    stream = engine.generate(request())
    first = asyncio.ensure_future(stream.__anext__())
    await until(lambda: engine.dispatch_checks >= 2)
    assert not first.done()
    await handle.remotes[0].queue.put(GenerationChunk(text="late"))
    assert (await asyncio.wait_for(first, 2)).text == "late"


def status_with(counts: dict[str, int]) -> Callable[[], Any]:
    def status() -> Any:
        deployments = {name: SimpleNamespace(replica_states={"RUNNING": n, "STARTING": 1})
                       for name, n in counts.items()}
        return SimpleNamespace(applications={"packserve": SimpleNamespace(deployments=deployments)})

    return status


async def test_the_watch_polls_closely_only_while_a_registrant_needs_it() -> None:
    counts = {"model-a": 1, "model-b": 0}
    watch = ReplicaWatch("packserve", poll_s=0.01, idle_poll_s=60, status=status_with(counts))
    needed = [True]
    watch.watch_closely(lambda: needed[0])
    assert watch.interval() == 0.01
    needed[0] = False
    assert watch.interval() == 60
    assert watch.running("model-a") is None  # nothing polled yet: unknown, not zero

    watch.start()
    try:
        await until(lambda: watch.polls >= 1)
        await asyncio.sleep(5 * watch.poll_s)  # five close intervals pass without a poll: the idle one is in force
        idle_polls = watch.polls
        assert idle_polls == 1  # the first poll happens at once, the next one only after 60 s
        assert watch.running("model-a") == 1 and watch.running("model-b") == 0  # STARTING is not running
        assert watch.running("model-c") == 0
        needed[0] = True  # e.g. a deployment that can scale to zero, or one that has not answered yet
        await until(lambda: watch.polls >= idle_polls + 5)
    finally:
        await watch.close()


async def test_an_engine_needs_the_close_watch_until_a_replica_has_answered() -> None:
    replicas: list[int | None] = [None]
    engine, handle = engine_with(replicas)
    assert not engine.settled()
    assert handle.ready_calls == 0  # no replica reported: nothing asked (it would scale a zero deployment up)
    replicas[0] = 1
    assert not engine.settled()  # reported running: asked in the background
    await asyncio.sleep(0)
    assert handle.ready_calls == 1
    handle.ready_event.set()
    await asyncio.sleep(0.01)
    assert engine.settled()
    replicas[0] = 0
    assert not engine.settled()  # seen at zero: watched closely again


def test_client_errors_keep_their_kind_across_the_ray_boundary() -> None:
    """Model replicas raise them; Ray pickles them; the gateway answers 400 only if the type survives."""
    from ray.exceptions import RayTaskError

    for raised in (PromptTooLong(5031, 2048), RequestRejected("Grammar error: Invalid type: strng")):
        crossed = pickle.loads(pickle.dumps(raised))
        assert type(crossed) is type(raised) and str(crossed) == str(raised)
        wrapped = RayTaskError("generate", "traceback", crossed)  # type: ignore[no-untyped-call]
        mapped = _engine_error(wrapped, before_first_token=True)
        assert type(mapped) is type(raised) and str(mapped) == str(raised)
        assert isinstance(mapped, EngineError) and mapped.before_first_token
    too_long = _engine_error(RayTaskError("generate", "tb", PromptTooLong(5031, 2048)), before_first_token=True)  # type: ignore[no-untyped-call]
    assert isinstance(too_long, PromptTooLong) and (too_long.prompt_tokens, too_long.limit) == (5031, 2048)
