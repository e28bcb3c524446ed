"""POST /v1/chat/completions and POST /v1/completions, JSON and SSE."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from loraserve.engine import CompletionDelta
from loraserve.errors import LoraserveError, sse_error
from loraserve.generation import FinishedCompletion, PreparedRequest
from loraserve.protocol.requests import ChatCompletionRequest, CompletionRequest
from loraserve.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    Usage,
)
from loraserve.routes.disconnect import ClientDisconnected, cancel_on_disconnect
from loraserve.services import Services, get_services

Deltas = AsyncGenerator[CompletionDelta, None]

router = APIRouter(prefix="/v1")

_DONE = b"data: [DONE]\n\n"
# 499: nginx's "client closed request"; nobody reads it, but logs do.
_CLIENT_GONE = 499


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json().encode() + b"\n\n"


def _event_stream(body: AsyncGenerator[bytes, None]) -> StreamingResponse:
    return StreamingResponse(
        body,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def hub_token(api_token: str | None, request: Request) -> str | None:
    """The requester's Hub token: LoRAX's `api_token` field, or a Bearer key that is an HF token."""
    if api_token:
        return api_token
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip().startswith("hf_") else None


async def _finish_plain(
    request: Request, services: Services, prepared: PreparedRequest
) -> FinishedCompletion | Response:
    try:
        return await cancel_on_disconnect(request, services.generator.complete(prepared))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_GONE)
    finally:
        prepared.release()


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | ChatCompletion:
    prepared = await services.generator.prepare_chat(body, hub_token(body.api_token, request))
    created = int(time.time())
    if body.stream:
        deltas = await services.generator.open_stream(prepared)
        return _event_stream(_chat_events(prepared, deltas, created, body.model, body.include_usage()))
    done = await _finish_plain(request, services, prepared)
    if isinstance(done, Response):
        return done
    return ChatCompletion(
        id=prepared.request_id,
        created=created,
        model=body.model,
        choices=[ChatChoice(index=0, message=AssistantMessage(content=done.text), finish_reason=done.finish_reason)],
        usage=_usage(done.prompt_tokens, done.completion_tokens),
    )


async def _chat_events(
    prepared: PreparedRequest, deltas: Deltas, created: int, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    def chunk(delta: ChatDelta, finish: CompletionDelta | None = None) -> bytes:
        reason = finish.finish_reason if finish else None
        choice = ChatChunkChoice(index=0, delta=delta, finish_reason=reason)
        return _sse(ChatCompletionChunk(id=prepared.request_id, created=created, model=model, choices=[choice]))

    tokens = 0
    try:
        yield chunk(ChatDelta(role="assistant", content=""))
        async for delta in deltas:
            tokens += len(delta.token_ids)
            if delta.text:
                yield chunk(ChatDelta(content=delta.text))
            if delta.finish_reason:
                yield chunk(ChatDelta(), delta)
        if include_usage:
            usage = _usage(len(prepared.prompt_token_ids), tokens)
            yield _sse(
                ChatCompletionChunk(id=prepared.request_id, created=created, model=model, choices=[], usage=usage)
            )
    except LoraserveError as exc:
        yield sse_error(exc)
    finally:
        await deltas.aclose()
        prepared.release()
    yield _DONE


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | Completion:
    prepared = await services.generator.prepare_completion(body, hub_token(body.api_token, request))
    created = int(time.time())
    if body.stream:
        deltas = await services.generator.open_stream(prepared)
        return _event_stream(_completion_events(prepared, deltas, created, body.model, body.include_usage()))
    done = await _finish_plain(request, services, prepared)
    if isinstance(done, Response):
        return done
    return Completion(
        id=prepared.request_id,
        created=created,
        model=body.model,
        choices=[CompletionChoice(index=0, text=done.text, finish_reason=done.finish_reason)],
        usage=_usage(done.prompt_tokens, done.completion_tokens),
    )


async def _completion_events(
    prepared: PreparedRequest, deltas: Deltas, created: int, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    tokens = 0
    try:
        async for delta in deltas:
            tokens += len(delta.token_ids)
            if delta.text or delta.finish_reason:
                choice = CompletionChoice(index=0, text=delta.text, finish_reason=delta.finish_reason)
                yield _sse(Completion(id=prepared.request_id, created=created, model=model, choices=[choice]))
        if include_usage:
            usage = _usage(len(prepared.prompt_token_ids), tokens)
            yield _sse(Completion(id=prepared.request_id, created=created, model=model, choices=[], usage=usage))
    except LoraserveError as exc:
        yield sse_error(exc)
    finally:
        await deltas.aclose()
        prepared.release()
    yield _DONE
