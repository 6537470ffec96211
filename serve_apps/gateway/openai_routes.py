"""OpenAI-compatible routes (thin: parse, convert, hand to the service, encode)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.types import EngineError, GenerationRequest
from serve_apps.gateway.body import parse
from serve_apps.gateway.errors import ApiError, model_not_found
from serve_apps.gateway.service import GatewayService, new_request_id, presented_key
from serve_apps.gateway.streaming import sse_response
from serve_apps.protocols import openai_convert as convert
from serve_apps.protocols.common import InvalidRequest
from serve_apps.protocols.openai_models import (
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingsRequest,
    validation_message,
)
from serve_apps.protocols.openai_stream import OpenAIChatStreamEncoder, OpenAICompletionStreamEncoder, error_event

PROTOCOL = "openai"


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

    async def generate(request: Request, body: ChatCompletionRequest | CompletionRequest, rid: str,
                       to_generation: Callable[..., GenerationRequest],
                       encoder: type[OpenAIChatStreamEncoder | OpenAICompletionStreamEncoder],
                       respond: Callable[..., dict[str, Any]]) -> Response:
        """Chat and text completions share everything but their converters and encoders."""
        principal = await service.authenticate(request)
        card = service.resolve(body.model, kind="chat")
        try:
            gen = to_generation(body, rid, card)
        except InvalidRequest as exc:
            raise ApiError(400, exc.message, "invalid_request", exc.param) from None
        dispatched = await service.dispatch(request, principal, card, gen, PROTOCOL)
        headers = service.headers(dispatched.ticket)
        created = int(time.time())
        if body.stream:
            enc = encoder(rid, body.model, created)
            return sse_response(dispatched.first, dispatched.chunks, enc.start, enc.chunk,
                                lambda: enc.finish(include_usage=body.include_usage), error_event, headers)
        try:
            result = await service.collect_from(dispatched)
        except EngineError:
            raise ApiError(502, "The model failed while generating.", "engine_error") from None
        return JSONResponse(respond(result, response_id=rid, model=body.model, created=created), headers=headers)

    @router.post("/chat/completions")
    async def chat(request: Request) -> Response:
        body = await parse(request, ChatCompletionRequest, max_body_bytes, validation_message)
        return await generate(request, body, new_request_id("chatcmpl"), convert.chat_to_generation,
                              OpenAIChatStreamEncoder, convert.chat_response)

    @router.post("/completions")
    async def completions(request: Request) -> Response:
        body = await parse(request, CompletionRequest, max_body_bytes, validation_message)
        return await generate(request, body, new_request_id("cmpl"), convert.completion_to_generation,
                              OpenAICompletionStreamEncoder, convert.completion_response)

    @router.post("/embeddings")
    async def embeddings(request: Request) -> Response:
        body = await parse(request, EmbeddingsRequest, max_body_bytes, validation_message)
        principal = await service.authenticate(request)
        card = service.resolve(body.model, kind="embeddings")
        try:
            req = convert.embeddings_to_request(body, new_request_id("emb"))
        except InvalidRequest as exc:
            raise ApiError(400, exc.message, "invalid_request", exc.param) from None
        ticket = await service.admit(request, principal, card)
        headers = service.headers(ticket)
        try:
            result = await service.embed(ticket, req, PROTOCOL)
        except EngineError:
            raise ApiError(502, "The embeddings model failed.", "engine_error") from None
        return JSONResponse(convert.embeddings_response(result, model=body.model,
                                                        encoding_format=body.encoding_format), headers=headers)

    return router
