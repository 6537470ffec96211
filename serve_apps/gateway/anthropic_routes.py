"""Anthropic-compatible routes: /messages and /messages/count_tokens."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.types import EngineError
from serve_apps.gateway.body import parse
from serve_apps.gateway.errors import ApiError
from serve_apps.gateway.service import GatewayService, new_request_id
from serve_apps.gateway.streaming import sse_response
from serve_apps.protocols import anthropic_convert as convert
from serve_apps.protocols.anthropic_models import CountTokensRequest, MessagesRequest, validation_message
from serve_apps.protocols.anthropic_stream import AnthropicStreamEncoder, error_event
from serve_apps.protocols.common import InvalidRequest

PROTOCOL = "anthropic"


def build_anthropic_router(service: GatewayService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/messages")
    async def messages(request: Request) -> Response:
        # Authenticated first, as Anthropic does, so a refused body is logged under its account.
        principal = await service.authenticate(request)
        body = await parse(request, MessagesRequest, max_body_bytes, validation_message)
        card = service.resolve(body.model, kind="chat")
        mid = new_request_id("msg", "_")
        try:
            gen = convert.messages_to_generation(body, mid, card)
        except InvalidRequest as exc:
            raise ApiError(400, exc.message, "invalid_request", exc.param) from None
        dispatched = await service.dispatch(request, principal, card, gen, PROTOCOL)
        headers = service.headers(dispatched.ticket)
        if body.stream:
            enc = AnthropicStreamEncoder(mid, body.model)
            # message_start needs the engine's prompt counts, so it opens with the first chunk.
            return sse_response(dispatched.first, dispatched.chunks, list, enc.chunk, enc.finish, error_event,
                                headers)
        try:
            result = await service.collect_from(dispatched)
        except EngineError:
            raise ApiError(502, "The model failed while generating.", "engine_error") from None
        return JSONResponse(convert.message_response(result, message_id=mid, model=body.model), headers=headers)

    @router.post("/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        """Free: authenticated, but neither bar is charged and no slot is taken."""
        await service.authenticate(request)
        body = await parse(request, CountTokensRequest, max_body_bytes, validation_message)
        card = service.resolve(body.model, kind="chat")
        messages, tools = convert.prompt_parts(body)
        count = await service.engine(card).count_tokens(card.id, messages, None, tools)
        return JSONResponse(convert.count_tokens_body(count))

    return router
