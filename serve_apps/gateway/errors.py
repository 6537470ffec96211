"""API errors, rendered in the shape of the API the client called, each built here once.

OpenAI clients get `{"error": {message, type, code, param}}`; Anthropic
clients (any path ending in /messages or /messages/count_tokens, or under
/anthropic) get `{"type": "error", "error": {type, message}}`. The official
SDKs then raise their typed errors. No stack trace ever reaches a body.

Every error of the request path has one function below, so one situation has
one wording whichever step or API meets it.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.requests import Request
from starlette.responses import JSONResponse

from cluster.key_limits import KeyRefusal
from serve_apps.engines.errors import UnknownModel as UnknownModel  # re-exported: the routes and the service catch it
from serve_apps.engines.types import PromptTooLong, RequestRejected
from serve_apps.protocols import anthropic_convert, openai_convert
from serve_apps.protocols.common import InvalidRequest

# How long a client waits before retrying when the store is away (it usually comes back within seconds).
STORE_RETRY_AFTER_S = 5
# After a cold-start timeout the replica keeps starting; this is when to come back.
COLD_START_RETRY_AFTER_S = 30


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


def invalid_api_key(message: str = "invalid API key") -> ApiError:
    """A missing, unknown, revoked or deleted key (`message` says which)."""
    return ApiError(401, message, "invalid_api_key")


def too_many_auth_failures(failures: int, limit: int, retry_s: int) -> ApiError:
    return ApiError(429, f"Too many requests with an invalid API key from this address ({failures} "
                         f"this minute; the limit is {limit}); retry in {retry_s} s with a valid key.",
                    "too_many_auth_failures", headers={"retry-after": str(retry_s)})


def invalid_request(exc: InvalidRequest) -> ApiError:
    """A body that validated but cannot be converted for the engine (the protocol converters say why)."""
    return ApiError(400, exc.message, "invalid_request", exc.param)


def wrong_kind(model: str, kind: str) -> ApiError:
    """A chat model asked for embeddings, or the reverse."""
    return ApiError(400, f"The model '{model}' is a {kind} model and cannot serve this endpoint.",
                    "model_not_supported", "model")


def key_refused(refusal: KeyRefusal) -> ApiError:
    """The key is disabled, expired or not allowed this model (cluster.key_limits words it)."""
    return ApiError(refusal.status, refusal.message, refusal.code,
                    "model" if refusal.code == "model_not_allowed" else None)


def client_closed(during: str | None = None) -> ApiError:
    """The client hung up before the answer started (499: nginx's code; nobody reads the body)."""
    return ApiError(499, "client closed the request" + (f" {during}" if during else ""), "client_closed")


def cold_start_timeout(model: str, timeout_s: float) -> ApiError:
    return ApiError(503, f"The model '{model}' is starting from zero replicas and was not ready within "
                         f"{timeout_s:g} s; it keeps starting, retry in {COLD_START_RETRY_AFTER_S} s.",
                    "model_cold_start_timeout", headers={"retry-after": str(COLD_START_RETRY_AFTER_S)})


def cold_twice(model: str) -> ApiError:
    """Dispatched twice, and each time the model's deployment had gone to zero replicas."""
    return ApiError(503, f"The model '{model}' went to zero replicas twice while this request was "
                         f"dispatched; retry in {COLD_START_RETRY_AFTER_S} s.", "model_cold_start_timeout",
                    headers={"retry-after": str(COLD_START_RETRY_AFTER_S)})


def overloaded(model: str, protocol: str, timeout_s: float, retry_after_s: int,
               headers: Mapping[str, str]) -> ApiError:
    """No sequence of the model freed up within the capacity wait's bound.

    Anthropic's overload status is 529 (its SDK retries it); OpenAI's is 503 with Retry-After.
    """
    return ApiError(overloaded_status(protocol),
                    f"The model '{model}' is at capacity and no sequence freed up within {timeout_s:g} s; this "
                    f"request was not charged. Retry after {retry_after_s} s.", "overloaded", headers=headers)


def overloaded_status(protocol: str) -> int:
    return 529 if protocol == "anthropic" else 503


def prompt_too_long(exc: PromptTooLong, protocol: str, param: str) -> ApiError:
    """A 400 worded as each provider words it: coding agents match these texts to compact their history."""
    if protocol == "anthropic":
        return ApiError(400, f"prompt is too long: {exc.prompt_tokens} tokens > {exc.limit} maximum",
                        "context_length_exceeded")
    if protocol == "responses":
        return ApiError(400, f"Your input exceeds the context window of this model ({exc.prompt_tokens} tokens > "
                             f"{exc.limit}). Please adjust your input and try again.", "context_length_exceeded",
                        "input")
    return ApiError(400, f"This model's maximum context length is {exc.limit} tokens. However, your "
                         f"{param} resulted in {exc.prompt_tokens} tokens. "
                         f"Please reduce the length of the {param}.", "context_length_exceeded", param)


def rejected_by_engine(exc: RequestRejected) -> ApiError:
    """The engine refused the request as invalid (e.g. a JSON schema it cannot compile)."""
    return ApiError(400, f"The model cannot serve this request: {exc}", "invalid_request")


def failed_before_output() -> ApiError:
    return ApiError(502, "The model failed before producing output; this request was not charged.", "engine_error")


def failed_while_generating() -> ApiError:
    """A non-streamed answer whose model failed after its first token (it is charged for what it produced)."""
    return ApiError(502, "The model failed while generating.", "engine_error")


def embeddings_failed() -> ApiError:
    return ApiError(502, "The embeddings model failed.", "engine_error")
