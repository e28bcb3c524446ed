"""The exception tree, and the one place that renders it as OpenAI error JSON.

    LoraserveError                      500 server_error
    ├── InvalidRequest                  400 invalid_request_error
    │   ├── ContextLengthExceeded       400 code=context_length_exceeded
    │   ├── ChatTemplateMissing         400 code=chat_template_missing
    │   ├── UnsupportedParameter        400 code=unsupported_parameter
    │   ├── InvalidAdapter              400 code=invalid_adapter
    │   ├── InvalidMerge                400 code=invalid_merged_adapters
    │   └── AdapterTooLarge             400 code=adapter_too_large
    ├── AuthenticationFailed            401 code=invalid_api_key
    ├── TooManyRequests                 429 code=rate_limit_exceeded, Retry-After
    ├── RequestTooLarge                 413 invalid_request_error
    ├── HeadersTooLarge                 431 invalid_request_error
    ├── ModelNotFound                   404 code=model_not_found, param=model
    ├── LoraNotFound                    404 code=lora_adapter_not_found (the load/unload API)
    ├── CacheFull                       507 code=adapter_cache_full
    ├── EngineUnavailable               503 service_unavailable
    │   ├── SourceUnavailable           503 code=adapter_source_unavailable
    │   ├── ServerBusy                  503 code=server_busy
    │   └── ServerShuttingDown          503 code=server_shutting_down
    └── EngineFailure                   500 server_error

Handlers raise these; they never build error responses by hand, and nothing
matches on message strings.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

logger = logging.getLogger(__name__)


class LoraserveError(Exception):
    status: int = 500
    type: str = "server_error"
    code: str | None = None
    retry_after: int | None = None  # seconds; set on errors a client should retry

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None


class InvalidRequest(LoraserveError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class ChatTemplateMissing(InvalidRequest):
    code = "chat_template_missing"


class UnsupportedParameter(InvalidRequest):
    code = "unsupported_parameter"


class InvalidAdapter(InvalidRequest):
    code = "invalid_adapter"

    def __init__(self, reason: str) -> None:
        super().__init__(reason, param="model")


class InvalidMerge(InvalidRequest):
    """A `merged_adapters` request that cannot be merged: a bad field, or adapters that do not fit together."""

    code = "invalid_merged_adapters"


class AdapterTooLarge(InvalidRequest):
    code = "adapter_too_large"


class CacheFull(LoraserveError):
    status = 507
    type = "server_error"
    code = "adapter_cache_full"
    retry_after = 10


class AuthenticationFailed(LoraserveError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": "Bearer"}


class TooManyRequests(LoraserveError):
    status = 429
    type = "requests"  # as OpenAI types a request-rate limit
    code = "rate_limit_exceeded"
    retry_after = 1


class RequestTooLarge(LoraserveError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(LoraserveError):
    status = 431
    type = "invalid_request_error"
    code = "request_header_fields_too_large"


class ModelNotFound(LoraserveError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model `{model}` does not exist or you do not have access to it.", param="model")


class LoraNotFound(LoraserveError):
    status = 404
    type = "invalid_request_error"
    code = "lora_adapter_not_found"


class EngineUnavailable(LoraserveError):
    status = 503
    type = "service_unavailable"
    code = "engine_unavailable"
    retry_after = 5

    @classmethod
    def engine_down(cls) -> EngineUnavailable:
        """The engine stopped, or refuses work because it did."""
        return cls("The inference engine is not available; try again later.")


class SourceUnavailable(EngineUnavailable):
    code = "adapter_source_unavailable"


class ServerBusy(EngineUnavailable):
    code = "server_busy"
    retry_after = 1


class ServerShuttingDown(EngineUnavailable):
    code = "server_shutting_down"


class EngineFailure(LoraserveError):
    status = 500
    type = "server_error"
    code = "engine_error"


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# Routes that speak LoRAX's native API (routes/lorax.py): their errors are written as LoRAX writes them,
# `{"error": message, "error_type": kind}` with LoRAX's statuses, because lorax-client raises by them.
LORAX_PATHS = frozenset({"/", "/generate", "/generate_stream", "/tokenize"})


def lorax_status_and_type(exc: LoraserveError) -> tuple[int, str]:
    if isinstance(exc, InvalidRequest | RequestTooLarge | HeadersTooLarge):
        return 422, "validation"  # LoRAX's input validation error
    if isinstance(exc, ServerBusy | TooManyRequests):
        return 429, "overloaded"
    if isinstance(exc, EngineFailure):
        return 424, "generation"
    kinds = {401: "authentication", 404: "not_found", 503: "unavailable", 507: "cache_full"}
    return exc.status, kinds.get(exc.status, "internal")


def lorax_error_body(exc: LoraserveError) -> dict[str, str]:
    return {"error": exc.message, "error_type": lorax_status_and_type(exc)[1]}


def error_response(exc: LoraserveError, path: str = "") -> JSONResponse:
    """``exc`` as the route's clients expect it: OpenAI's shape, or LoRAX's on LoRAX's routes."""
    if path in LORAX_PATHS:
        return JSONResponse(lorax_error_body(exc), status_code=lorax_status_and_type(exc)[0], headers=exc.headers())
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers())


async def refuse(exc: LoraserveError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer ``exc`` from a middleware, before any route runs (the request's log line names its code)."""
    scope.setdefault("state", {})["error_code"] = exc.code or exc.type
    await error_response(exc, scope.get("path", ""))(scope, receive, send)


def sse_error(exc: LoraserveError) -> bytes:
    """An error after the first byte of a stream goes in-band, as OpenAI does."""
    return f"data: {json.dumps(exc.to_dict())}\n\n".encode()


def _validation_param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI writes a parameter: ``messages[0].content``.

    pydantic also puts the tried union member in the location (``str``, ``list[TextContentPart]``);
    that is not a parameter, so it is left out.
    """
    param = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif not _is_union_member_tag(str(part)):
            param += f".{part}" if param else str(part)
    return param or None


def _is_union_member_tag(part: str) -> bool:
    return any(c in part for c in "[(-") or part in {"str", "int", "float", "bool", "dict", "list", "none"}


async def _on_loraserve_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LoraserveError)
    request.state.error_code = exc.code or exc.type  # for the request's log line (loraserve.observe)
    if exc.status >= 500:
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(exc, request.url.path)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(_validation_failure(exc), request.url.path)


def _validation_failure(exc: RequestValidationError) -> InvalidRequest:
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        message = "The request body is not valid JSON: " + str(first.get("ctx", {}).get("error", "parse error"))
        return InvalidRequest(message)
    if first.get("type") == "invalid_combination":  # our cross-field checks name their parameter
        return InvalidRequest(str(first.get("msg")), param=(first.get("ctx") or {}).get("param"))
    loc = tuple(first.get("loc", ()))
    if loc == ("body",):
        return InvalidRequest("The request body must be a JSON object (Content-Type: application/json).")
    param = _validation_param(loc)
    detail = first.get("msg", "invalid value")
    message = f"Invalid value for '{param}': {detail}" if param else f"Invalid request: {detail}"
    return InvalidRequest(message, param=param)


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 413:
        return error_response(RequestTooLarge(str(exc.detail)), request.url.path)
    type_ = "invalid_request_error" if exc.status_code < 500 else "server_error"
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return JSONResponse(
        error_body(str(exc.detail), type_, None, code), status_code=exc.status_code, headers=exc.headers
    )


async def _on_unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Never leak internals (paths, tokens) to the client; the log has the trace.
    logger.exception("unhandled error", exc_info=exc)
    return error_response(LoraserveError("The server had an error while processing your request."), request.url.path)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(LoraserveError, _on_loraserve_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected)
