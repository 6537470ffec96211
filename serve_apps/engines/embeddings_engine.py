"""Sentence embeddings on CPU with transformers, for the catalog's embeddings models.

It reproduces what sentence-transformers does for all-MiniLM-L6-v2 (the
model's `modules.json`: transformer, mean pooling over real tokens, L2
normalize) without depending on that package. Torch work runs in a worker
thread so the event loop keeps streaming other requests meanwhile; one lock
serializes batches, since torch already uses every core for one batch.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

from serve_apps.engines.errors import UnknownModel
from serve_apps.engines.types import (
    ChatMessage,
    EmbeddingRequest,
    EmbeddingResult,
    Engine,
    GenerationChunk,
    GenerationRequest,
    ModelCard,
    ToolSpec,
)

_DEFAULT_MAX_SEQ_LENGTH = 256


class EmbeddingsEngine(Engine):
    """`Engine` for one embeddings model directory; text generation is refused."""

    def __init__(self, card: ModelCard, model_dir: str | Path, batch_size: int = 32) -> None:
        if card.kind != "embeddings":
            raise ValueError(f"{card.id}: EmbeddingsEngine serves embeddings models, not {card.kind!r}")
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.card = card
        self.model_dir = Path(model_dir)
        self.batch_size = batch_size
        self.max_seq_length = _max_seq_length(self.model_dir)
        self._model: Any = None
        self._tokenizer: Any = None
        self._start_lock = asyncio.Lock()
        self._run_lock = asyncio.Lock()

    @property
    def ready(self) -> bool:
        return self._model is not None

    async def start(self) -> None:
        if self._model is not None:
            return
        async with self._start_lock:
            if self._model is None:
                self._tokenizer, self._model = await asyncio.to_thread(self._load)

    def _load(self) -> tuple[Any, Any]:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True)
        model.eval()
        return tokenizer, model

    def shutdown(self) -> None:
        self._model = None
        self._tokenizer = None

    def cards(self) -> list[ModelCard]:
        return [self.card]

    def _check(self, model: str) -> None:
        if model != self.card.id:
            raise UnknownModel(model)

    async def embed(self, request: EmbeddingRequest) -> EmbeddingResult:
        self._check(request.model)
        await self.start()
        if not request.inputs:
            return EmbeddingResult(vectors=(), prompt_tokens=0)
        async with self._run_lock:
            return await asyncio.to_thread(self._embed_sync, request.inputs)

    def _embed_sync(self, inputs: tuple[str, ...]) -> EmbeddingResult:
        import torch

        vectors: list[tuple[float, ...]] = []
        tokens = 0
        for start in range(0, len(inputs), self.batch_size):
            batch = list(inputs[start : start + self.batch_size])
            encoded = self._tokenizer(
                batch, padding=True, truncation=True, max_length=self.max_seq_length, return_tensors="pt"
            )
            with torch.inference_mode():
                hidden = self._model(**encoded).last_hidden_state
            # Mean over real tokens only: padding must not pull short texts
            # toward the pad embedding.
            mask = encoded["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * mask).sum(dim=1)
            pooled = summed / mask.sum(dim=1).clamp(min=1e-9)
            normalized = torch.nn.functional.normalize(pooled, p=2, dim=1)
            vectors.extend(tuple(float(x) for x in row) for row in normalized.tolist())
            tokens += int(encoded["attention_mask"].sum())
        return EmbeddingResult(vectors=tuple(vectors), prompt_tokens=tokens)

    async def count_tokens(
        self,
        model: str,
        messages: tuple[ChatMessage, ...],
        prompt: str | None,
        tools: tuple[ToolSpec, ...],
    ) -> int:
        # Chat-only method: this engine serves no chat model.
        raise UnknownModel(model)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        # This engine serves no chat model: not an engine failure.
        raise UnknownModel(request.model)
        yield GenerationChunk()  # unreachable; makes this an async generator like every engine's generate

    async def abort(self, request_id: str) -> None:
        # Embedding calls are short and not streamed; there is nothing to stop.
        return None


def _max_seq_length(model_dir: Path) -> int:
    # sentence-transformers truncates at this, not at the model's 512 positions;
    # matching it keeps our vectors identical to theirs.
    try:
        config = json.loads((model_dir / "sentence_bert_config.json").read_text())
        return int(config["max_seq_length"])
    except (OSError, ValueError, KeyError, TypeError):
        return _DEFAULT_MAX_SEQ_LENGTH
