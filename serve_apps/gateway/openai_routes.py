"""OpenAI-compatible routes (thin: parse, hand to the service's request story, encode)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.types import EmbeddingRequest, EmbeddingResult, GenerationRequest, ModelCard
from serve_apps.gateway.body import parse
from serve_apps.gateway.errors import model_not_found
from serve_apps.gateway.service import GatewayService, new_request_id, presented_key
from serve_apps.gateway.streaming import SseEvents
from serve_apps.protocols import openai_convert as convert
from serve_apps.protocols.common import GenerationResult
from serve_apps.protocols.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    validation_message,
)
from serve_apps.protocols.openai_stream import OpenAIChatStreamEncoder, OpenAICompletionStreamEncoder, error_event

PROTOCOL = "openai"


@dataclass(frozen=True)
class OpenAIGeneration:
    """A chat or text completion: they differ only in their converters and encoders."""

    req: ChatCompletionRequest | CompletionRequest
    rid: str
    to_generation: Callable[..., GenerationRequest]
    encoder: type[OpenAIChatStreamEncoder | OpenAICompletionStreamEncoder]
    respond: Callable[..., dict[str, Any]]

    @property
    def model(self) -> str:
        return self.req.model

    @property
    def stream(self) -> bool:
        return bool(self.req.stream)

    def generation(self, card: ModelCard) -> GenerationRequest:
        return self.to_generation(self.req, self.rid, card)

    def events(self, created: int) -> SseEvents:
        enc = self.encoder(self.rid, self.req.model, created)
        return SseEvents(enc.start, enc.chunk, lambda: enc.finish(include_usage=self.req.include_usage), error_event)

    def answer(self, result: GenerationResult, created: int) -> dict[str, Any]:
        return self.respond(result, response_id=self.rid, model=self.req.model, created=created)


@dataclass(frozen=True)
class OpenAIEmbedding:
    req: EmbeddingsRequest

    @property
    def model(self) -> str:
        return self.req.model

    def embedding(self) -> EmbeddingRequest:
        return convert.embeddings_to_request(self.req, new_request_id("emb"))

    def answer(self, result: EmbeddingResult) -> dict[str, Any]:
        return convert.embeddings_response(result, model=self.req.model, encoding_format=self.req.encoding_format)


def build_openai_router(service: GatewayService, max_body_bytes: int,
                        warm: Mapping[str, bool] | Callable[[], Mapping[str, bool]] | None = None) -> APIRouter:
    router = APIRouter()
    weights = {cid: float(Fraction(service.controller.policy.units(service.controller.price(cid)), service.unit))
               for cid in service.cards}

    def warm_now() -> Mapping[str, bool] | None:
        return warm() if callable(warm) else warm

    async def reject_a_wrong_key(request: Request) -> None:
        # The catalog is public, but a key that is presented must be valid: clients "test the
        # connection" by listing models, and a 200 would tell a user with a mistyped key all is well.
        if presented_key(request) is not None:
            await service.authenticate(request)

    @router.get("/models")
    async def models(request: Request) -> Response:
        await reject_a_wrong_key(request)
        return JSONResponse(convert.models_list(service.cards.values(), weights, warm_now()))

    @router.get("/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Response:
        await reject_a_wrong_key(request)
        card = service.cards.get(model_id)
        if card is None:
            raise model_not_found(model_id)
        return JSONResponse(convert.models_list([card], weights, warm_now())["data"][0])

    @router.post("/chat/completions")
    async def chat(request: Request) -> Response:
        async def read() -> OpenAIGeneration:
            body = await parse(request, ChatCompletionRequest, max_body_bytes, validation_message)
            return OpenAIGeneration(body, new_request_id("chatcmpl"), convert.chat_to_generation,
                                    OpenAIChatStreamEncoder, convert.chat_response)

        return await service.generate(request, PROTOCOL, read)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        async def read() -> OpenAIGeneration:
            body = await parse(request, CompletionRequest, max_body_bytes, validation_message)
            return OpenAIGeneration(body, new_request_id("cmpl"), convert.completion_to_generation,
                                    OpenAICompletionStreamEncoder, convert.completion_response)

        return await service.generate(request, PROTOCOL, read)

    @router.post("/embeddings")
    async def embeddings(request: Request) -> Response:
        async def read() -> OpenAIEmbedding:
            return OpenAIEmbedding(await parse(request, EmbeddingsRequest, max_body_bytes, validation_message))

        return await service.embeddings(request, PROTOCOL, read)

    return router
