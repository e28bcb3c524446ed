"""What every front door shares: one answer, JSON or a stream, that owns what it holds until it ends.

A front door builds its ``GenerationRequest`` and two serializers (the plain body,
the stream's bytes); ``answer`` runs the pipeline between them.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Callable, Mapping
from contextlib import AsyncExitStack
from typing import TypeVar

import anyio
from fastapi import Request, Response
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from loraserve.access import AUTHORIZED
from loraserve.generation import FinishedCompletion, GenerationRequest, PreparedRequest
from loraserve.observe import request_record
from loraserve.routes.disconnect import ClientDisconnected, cancel_on_disconnect
from loraserve.services import Services
from loraserve.streams import PrimedStream

R = TypeVar("R")
# 499: nginx's "client closed request"; nobody reads it, but logs do.
CLIENT_GONE = 499
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class EventStream(StreamingResponse):
    """SSE that owns what its answer holds (the engine stream, the adapter) and closes it however the
    response ends: also when the client leaves before the body's first byte (then the body never runs)."""

    def __init__(
        self, body: AsyncGenerator[bytes, None], held: AsyncExitStack, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})})
        self._held = held

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Shielded: when the client leaves, Starlette cancels this scope, and every await here would be
            # cancelled again before the engine request is aborted and the adapter released.
            with anyio.CancelScope(shield=True):
                await self._held.aclose()


def hub_token(api_token: str | None, request: Request) -> str | None:
    """The requester's Hub token: LoRAX's `api_token` field, or a Bearer key that is an HF token.

    When the server has an API key, the Bearer key is that key: never a Hub token, never sent to the Hub.
    """
    if api_token:
        return api_token
    if request.scope.get("state", {}).get(AUTHORIZED):
        return None
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip().startswith("hf_") else None


async def answer(
    request: Request,
    services: Services,
    generation: GenerationRequest,
    stream: bool,
    events: Callable[[PreparedRequest, PrimedStream, int], AsyncGenerator[bytes, None]],
    plain: Callable[[PreparedRequest, FinishedCompletion, int], R],
    stream_headers: Callable[[PreparedRequest], Mapping[str, str]] | None = None,
) -> Response | R:
    """One answer, JSON or SSE, holding its model (the adapter lease) exactly as long as the answer lasts.

    A stream opens once its first token is there, so engine errors at admission are still an HTTP
    status; a client that leaves before it aborts the request (prefill can take seconds, and nothing
    is sent yet that would notice). Then the response becomes the one owner of what is held.
    """
    record = request_record(request)
    record.requested = generation.model
    generator = services.generator
    async with AsyncExitStack() as held:
        prepared = await held.enter_async_context(generator.prepare(generation))
        target = prepared.target
        record.answered_by(target.name, target.lora is not None, prepared.prompt_tokens, prepared.progress)
        created = int(time.time())
        if stream:
            try:
                deltas = await cancel_on_disconnect(request, generator.open_stream(prepared))
            except ClientDisconnected:
                return Response(status_code=CLIENT_GONE)
            held.push_async_callback(deltas.aclose)
            headers = stream_headers(prepared) if stream_headers else None
            return EventStream(events(prepared, deltas, created), held.pop_all(), headers)
        try:
            done = await cancel_on_disconnect(request, generator.complete(prepared))
        except ClientDisconnected:
            return Response(status_code=CLIENT_GONE)
    return plain(prepared, done, created)
