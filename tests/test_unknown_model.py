"""A model id the gateway's catalog has but the engine it reaches does not serve: 404 in the API's shape.

That happens when a replica was built from another catalog than the gateway's
(a redeploy in progress, an adapter not loaded there). The engine raises
`UnknownModel` (a bare KeyError crossing the replica boundary is read as one
too); the client gets `model_not_found`, nothing is charged and no slot is
kept.
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path

import anthropic
import openai
import pytest

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.sim import SimulatedEngine
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    ToolSpec,
)
from tests.live_gateway import LiveGateway

LARGE = "hf:packserve/sim-large"  # in the catalog, not served by the engine
SMALL = "hf:packserve/sim-small"
EMBED = "hf:packserve/sim-embed"


class NarrowEngine(SimulatedEngine):
    """The simulated catalog, of which only `served` is actually served (as on a replica built from another)."""

    def __init__(self, served: set[str]) -> None:
        super().__init__()
        self.served = served

    def _require(self, model: str) -> None:
        if model not in self.served:
            raise UnknownModel(model)

    async def count_tokens(self, model: str, messages: tuple[ChatMessage, ...], prompt: str | None,
                           tools: tuple[ToolSpec, ...]) -> int:
        self._require(model)
        return await super().count_tokens(model, messages, prompt, tools)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._require(request.model)
        return await super().embed(request)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._require(request.model)
        async for chunk in super().generate(request):
            yield chunk


@pytest.fixture
def gw(redis_url: str, tmp_path: Path) -> Iterator[LiveGateway]:
    gateway = LiveGateway(redis_url=redis_url, data_dir=tmp_path, queue_timeout_s=0)
    gateway.engine = NarrowEngine({SMALL})
    with gateway as g:
        yield g


def test_an_unserved_model_is_404_in_each_apis_shape_uncharged(gw: LiveGateway) -> None:
    _, key = gw.new_key(["standard"])
    before = gw.quotas(key)
    client = openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=key, max_retries=0, timeout=30)
    # More attempts than the pack's concurrency: a kept slot would turn the later ones into 429s.
    for stream in (False, True, False, True, False, True):
        with pytest.raises(openai.NotFoundError) as err:
            client.chat.completions.create(model=LARGE, messages=[{"role": "user", "content": "hi"}], stream=stream)
        assert err.value.code == "model_not_found" and LARGE in err.value.message
        assert "GET /v1/models" in err.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model=LARGE, prompt="hi")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model=EMBED, input="hi")
    messages = anthropic.Anthropic(base_url=gw.base_url, api_key=key, max_retries=0, timeout=30).messages
    with pytest.raises(anthropic.NotFoundError) as aerr:
        messages.create(model=LARGE, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert aerr.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError):
        messages.count_tokens(model=LARGE, messages=[{"role": "user", "content": "hi"}])
    after = gw.quotas(key)
    assert after["rollingFiveHourLimit"] == before["rollingFiveHourLimit"]
    assert after["weeklyTokenLimit"] == before["weeklyTokenLimit"]
    ok = client.chat.completions.create(model=SMALL, messages=[{"role": "user", "content": "hi"}], max_tokens=3)
    assert ok.choices[0].message.content is not None


def test_unknown_model_survives_the_ray_boundary_as_itself() -> None:
    crossed = pickle.loads(pickle.dumps(UnknownModel("hf:org/adapter")))
    assert type(crossed) is UnknownModel and crossed.model == "hf:org/adapter"
    assert isinstance(crossed, KeyError)


def test_a_replica_refuses_an_id_outside_its_catalog_and_the_boundary_keeps_the_kind() -> None:
    """ModelServer (plain Python, as Ray Serve runs it) and the handle engine's mapping of what crosses back."""
    from ray.exceptions import RayTaskError

    from serve_apps.config import AppConfig
    from serve_apps.deploy.engine_proxy import _engine_error
    from serve_apps.deploy.model_server import ModelServer

    server = ModelServer(SMALL, AppConfig.model_validate({}).model_dump(mode="json"))
    with pytest.raises(UnknownModel) as err:
        asyncio.run(server.count_tokens(LARGE, (ChatMessage(role="user", content="hi"),), None, ()))
    assert err.value.model == LARGE
    for raised in (err.value, KeyError(LARGE)):
        mapped = _engine_error(RayTaskError("generate", "tb", raised), before_first_token=True)  # type: ignore[no-untyped-call]
        assert type(mapped) is UnknownModel and mapped.model == LARGE
