"""Anthropic-compatible routes: /messages and /messages/count_tokens (thin: parse, hand to the service, encode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response

from serve_apps.engines.types import ChatMessage, GenerationRequest, ModelCard, ToolSpec
from serve_apps.gateway.body import parse
from serve_apps.gateway.service import GatewayService, new_request_id
from serve_apps.gateway.streaming import SseEvents
from serve_apps.protocols import anthropic_convert as convert
from serve_apps.protocols.anthropic_models import CountTokensRequest, MessagesRequest, validation_message
from serve_apps.protocols.anthropic_stream import AnthropicStreamEncoder, error_event
from serve_apps.protocols.common import GenerationResult

PROTOCOL = "anthropic"


@dataclass(frozen=True)
class AnthropicMessage:
    req: MessagesRequest
    mid: str

    @property
    def model(self) -> str:
        return self.req.model

    @property
    def stream(self) -> bool:
        return bool(self.req.stream)

    def generation(self, card: ModelCard) -> GenerationRequest:
        return convert.messages_to_generation(self.req, self.mid, card)

    def events(self, created: int) -> SseEvents:
        enc = AnthropicStreamEncoder(self.mid, self.req.model)
        # message_start needs the engine's prompt counts, so it opens with the first chunk.
        return SseEvents(list, enc.chunk, enc.finish, error_event)

    def answer(self, result: GenerationResult, created: int) -> dict[str, Any]:
        return convert.message_response(result, message_id=self.mid, model=self.req.model)


@dataclass(frozen=True)
class AnthropicTokenCount:
    req: CountTokensRequest

    @property
    def model(self) -> str:
        return self.req.model

    def prompt(self) -> tuple[tuple[ChatMessage, ...], tuple[ToolSpec, ...]]:
        return convert.prompt_parts(self.req)


def build_anthropic_router(service: GatewayService, max_body_bytes: int) -> APIRouter:
    router = APIRouter()

    @router.post("/messages")
    async def messages(request: Request) -> Response:
        async def read() -> AnthropicMessage:
            body = await parse(request, MessagesRequest, max_body_bytes, validation_message)
            return AnthropicMessage(body, new_request_id("msg", "_"))

        return await service.generate(request, PROTOCOL, read, authenticate_first=True)

    @router.post("/messages/count_tokens")
    async def count_tokens(request: Request) -> Response:
        async def read() -> AnthropicTokenCount:
            return AnthropicTokenCount(await parse(request, CountTokensRequest, max_body_bytes, validation_message))

        return JSONResponse(convert.count_tokens_body(await service.count_tokens(request, read)))

    return router
