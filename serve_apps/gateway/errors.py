"""API errors, rendered in the shape of the API the client called.

OpenAI clients get `{"error": {message, type, code, param}}`; Anthropic
clients (any path ending in /messages or /messages/count_tokens, or under
/anthropic) get `{"type": "error", "error": {type, message}}`. The official
SDKs then raise their typed errors. No stack trace ever reaches a body.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse

from serve_apps.engines.errors import UnknownModel as UnknownModel  # re-exported: the routes and the service catch it
from serve_apps.protocols import anthropic_convert, openai_convert

# How long a client waits before retrying when the store is away (it usually comes back within seconds).
STORE_RETRY_AFTER_S = 5


class ApiError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.headers = dict(headers or {})


def is_anthropic_path(path: str) -> bool:
    return path.startswith("/anthropic/") or path.endswith("/messages") or path.endswith("/messages/count_tokens")


def error_response(request: Request, err: ApiError) -> JSONResponse:
    if is_anthropic_path(request.url.path):
        body = anthropic_convert.error_body(err.status, err.message)
    else:
        body = openai_convert.error_body(err.status, err.message, code=err.code, param=err.param)
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def store_unavailable() -> ApiError:
    """The quota store did not answer: nothing was charged, and the client may retry shortly."""
    return ApiError(503, "the quota store is unavailable, retry shortly", "store_unavailable",
                    headers={"retry-after": str(STORE_RETRY_AFTER_S)})


def model_not_found(model: str) -> ApiError:
    """An id that is not in the catalog (ids are matched exactly)."""
    return ApiError(404, f"The model '{model}' does not exist. Model ids are exact and case-sensitive "
                         "(e.g. 'hf:org/model'); GET /v1/models lists the available ones.", "model_not_found", "model")


def not_served(exc: UnknownModel) -> ApiError:
    """The catalog has the model but the engine it reached does not serve it (a replica built from another catalog)."""
    return ApiError(404, f"The model '{exc.model}' is not served by its replica right now (a deployment may be "
                         "updating); GET /v1/models lists the available ones.", "model_not_found", "model")
