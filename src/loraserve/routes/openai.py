"""POST /v1/chat/completions and POST /v1/completions, JSON and SSE."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import BaseModel
from starlette.types import Receive, Scope, Send

from loraserve.access import AUTHORIZED
from loraserve.engine import TokenLogprob
from loraserve.errors import EngineFailure, LoraserveError, sse_error
from loraserve.generation import FinishedChoice, FinishedCompletion, PreparedRequest, PrimedStream
from loraserve.observe import request_record
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
    DeltaFunctionCall,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
    Usage,
)
from loraserve.routes.disconnect import ClientDisconnected, cancel_on_disconnect
from loraserve.routes.shaping import chat_logprobs, completion_logprobs
from loraserve.services import Services, get_services
from loraserve.tools import ParsedToolCall, ToolPlan

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

_DONE = b"data: [DONE]\n\n"
R = TypeVar("R")
# 499: nginx's "client closed request"; nobody reads it, but logs do.
_CLIENT_GONE = 499


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json().encode() + b"\n\n"


class _EventStream(StreamingResponse):
    """SSE that owns what its answer holds (the engine stream, the adapter) and closes it however the
    response ends: also when the client leaves before the body's first byte (then the body never runs)."""

    def __init__(self, body: AsyncGenerator[bytes, None], held: AsyncExitStack) -> None:
        super().__init__(
            body, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )
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


async def _finish_plain(
    request: Request, services: Services, prepared: PreparedRequest
) -> FinishedCompletion | Response:
    try:
        return await cancel_on_disconnect(request, services.generator.complete(prepared))
    except ClientDisconnected:
        return Response(status_code=_CLIENT_GONE)


async def _answer(
    request: Request,
    services: Services,
    requested: str,
    preparing: AbstractAsyncContextManager[PreparedRequest],
    stream: bool,
    events: Callable[[PreparedRequest, PrimedStream, int], AsyncGenerator[bytes, None]],
    plain: Callable[[PreparedRequest, FinishedCompletion, int], R],
) -> Response | R:
    """One answer, JSON or SSE, holding its model (the adapter lease) exactly as long as the answer lasts.

    A stream opens once its first token is there, so engine errors at admission are still an HTTP
    status; a client that leaves before it aborts the request (prefill can take seconds, and nothing
    is sent yet that would notice). Then the response becomes the one owner of what is held.
    """
    request_record(request).requested = requested
    async with AsyncExitStack() as held:
        prepared = await held.enter_async_context(preparing)
        target = prepared.target
        request_record(request).answered_by(
            target.name, target.lora is not None, prepared.prompt_tokens, prepared.progress
        )
        created = int(time.time())
        if stream:
            try:
                deltas = await cancel_on_disconnect(request, services.generator.open_stream(prepared))
            except ClientDisconnected:
                return Response(status_code=_CLIENT_GONE)
            held.push_async_callback(deltas.aclose)
            return _EventStream(events(prepared, deltas, created), held.pop_all())
        done = await _finish_plain(request, services, prepared)
    if isinstance(done, Response):
        return done
    return plain(prepared, done, created)


def _tool_calls(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


# -- chat ------------------------------------------------------------------


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | ChatCompletion:
    return await _answer(
        request,
        services,
        body.model,
        services.generator.prepare_chat(body, hub_token(body.api_token, request)),
        body.stream,
        lambda prepared, deltas, created: _chat_events(
            prepared, deltas, created, prepared.target.name, body.include_usage()
        ),
        lambda prepared, done, created: ChatCompletion(
            id=prepared.request_id,
            created=created,
            model=prepared.target.name,
            choices=[_chat_choice(prepared, choice) for choice in done.choices],
            usage=_usage(done.prompt_tokens, done.completion_tokens),
        ),
    )


def _chat_choice(prepared: PreparedRequest, choice: FinishedChoice) -> ChatChoice:
    logprobs = chat_logprobs(choice.logprobs) if prepared.want_logprobs else None
    calls = prepared.tools.parse(choice.text) if prepared.tools else None
    if calls:
        message = AssistantMessage(content=None, tool_calls=_tool_calls(calls))
        return ChatChoice(index=choice.index, message=message, finish_reason="tool_calls", logprobs=logprobs)
    assert choice.finish_reason is not None
    return ChatChoice(
        index=choice.index,
        message=AssistantMessage(content=choice.text),
        finish_reason=choice.finish_reason,
        logprobs=logprobs,
    )


@dataclass
class _ChoiceStream:
    """Per-choice state of a chat stream: text held back while it may still be a tool call."""

    held: str = ""
    held_logprobs: list[TokenLogprob] = field(default_factory=list)
    holding: bool = True


async def _chat_events(
    prepared: PreparedRequest, deltas: PrimedStream, created: int, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    def chunk(
        index: int, delta: ChatDelta, finish: str | None = None, logprobs: list[TokenLogprob] | None = None
    ) -> bytes:
        choice = ChatChunkChoice(
            index=index,
            delta=delta,
            finish_reason=finish,  # type: ignore[arg-type]
            logprobs=chat_logprobs(logprobs) if prepared.want_logprobs and logprobs is not None else None,
        )
        return _sse(ChatCompletionChunk(id=prepared.request_id, created=created, model=model, choices=[choice]))

    tools: ToolPlan | None = prepared.tools
    states: dict[int, _ChoiceStream] = {}
    tokens = 0
    try:
        async for delta in deltas:
            tokens += len(delta.token_ids)
            state = states.get(delta.index)
            if state is None:
                state = states[delta.index] = _ChoiceStream(holding=tools is not None)
                yield chunk(delta.index, ChatDelta(role="assistant", content=""))
            if state.holding and tools is not None:
                state.held += delta.text
                state.held_logprobs.extend(delta.logprobs or ())
                if not tools.may_be_call(state.held):
                    state.holding = False
                    yield chunk(delta.index, ChatDelta(content=state.held), logprobs=state.held_logprobs)
            elif delta.text:
                yield chunk(delta.index, ChatDelta(content=delta.text), logprobs=delta.logprobs)
            if delta.finish_reason is None:
                continue
            finish: str = delta.finish_reason
            if state.holding and tools is not None:
                calls = tools.parse(state.held)
                if calls:
                    tool_deltas = [
                        DeltaToolCall(
                            index=i,
                            id=c.id,
                            type="function",
                            function=DeltaFunctionCall(name=c.name, arguments=c.arguments),
                        )
                        for i, c in enumerate(calls)
                    ]
                    yield chunk(delta.index, ChatDelta(tool_calls=tool_deltas), logprobs=state.held_logprobs)
                    finish = "tool_calls"
                elif state.held:
                    yield chunk(delta.index, ChatDelta(content=state.held), logprobs=state.held_logprobs)
            yield chunk(delta.index, ChatDelta(), finish)
        if include_usage:
            usage = _usage(prepared.prompt_tokens, tokens)
            yield _sse(
                ChatCompletionChunk(id=prepared.request_id, created=created, model=model, choices=[], usage=usage)
            )
    except LoraserveError as exc:
        yield sse_error(exc)
    except Exception:  # our own bug mid-stream: still end the stream the way clients expect
        logger.exception("stream %s failed", prepared.request_id)
        yield sse_error(EngineFailure("The server failed while streaming; the answer is incomplete."))
    yield _DONE


# -- completions -------------------------------------------------------------


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | Completion:
    return await _answer(
        request,
        services,
        body.model,
        services.generator.prepare_completion(body, hub_token(body.api_token, request)),
        body.stream,
        lambda prepared, deltas, created: _completion_events(
            prepared, deltas, created, prepared.target.name, body.include_usage()
        ),
        lambda prepared, done, created: Completion(
            id=prepared.request_id,
            created=created,
            model=prepared.target.name,
            choices=[_completion_choice(prepared, choice) for choice in done.choices],
            usage=_usage(done.prompt_tokens, done.completion_tokens),
        ),
    )


def _prompt_of(prepared: PreparedRequest, index: int) -> tuple[str, list[int]]:
    call = prepared.calls[index // prepared.n]
    return call.prompt_text, call.prompt_token_ids


def _first_token_text(prepared: PreparedRequest, prompt_ids: list[int]) -> list[str]:
    return [str(prepared.target.chat.tokenizer.decode(prompt_ids[:1]))]


def _completion_choice(prepared: PreparedRequest, choice: FinishedChoice) -> CompletionChoice:
    prompt_text, prompt_ids = _prompt_of(prepared, choice.index)
    text = prompt_text + choice.text if prepared.echo else choice.text
    logprobs = None
    if prepared.want_logprobs:
        entries: list[TokenLogprob | None] = []
        if prepared.echo:
            entries.extend(choice.prompt_logprobs or [])
        entries.extend(choice.logprobs)
        logprobs = completion_logprobs(entries, _first_token_text(prepared, prompt_ids))
    return CompletionChoice(index=choice.index, text=text, finish_reason=choice.finish_reason, logprobs=logprobs)


async def _completion_events(
    prepared: PreparedRequest, deltas: PrimedStream, created: int, model: str, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    def chunk(choice: CompletionChoice) -> bytes:
        return _sse(Completion(id=prepared.request_id, created=created, model=model, choices=[choice]))

    tokens = 0
    offsets: dict[int, int] = {}
    try:
        async for delta in deltas:
            tokens += len(delta.token_ids)
            if delta.index not in offsets:
                offsets[delta.index] = 0
                if prepared.echo:
                    prompt_text, prompt_ids = _prompt_of(prepared, delta.index)
                    echoed = None
                    if prepared.want_logprobs:
                        echoed = completion_logprobs(
                            delta.prompt_logprobs or [], _first_token_text(prepared, prompt_ids)
                        )
                    yield chunk(
                        CompletionChoice(index=delta.index, text=prompt_text, finish_reason=None, logprobs=echoed)
                    )
                    offsets[delta.index] = len(prompt_text)
            if delta.text or delta.finish_reason or delta.logprobs:
                logprobs = None
                if prepared.want_logprobs:
                    logprobs = completion_logprobs(delta.logprobs or [], None, offsets[delta.index])
                offsets[delta.index] += len(delta.text)
                yield chunk(
                    CompletionChoice(
                        index=delta.index, text=delta.text, finish_reason=delta.finish_reason, logprobs=logprobs
                    )
                )
        if include_usage:
            usage = _usage(prepared.prompt_tokens, tokens)
            yield _sse(Completion(id=prepared.request_id, created=created, model=model, choices=[], usage=usage))
    except LoraserveError as exc:
        yield sse_error(exc)
    except Exception:  # our own bug mid-stream: still end the stream the way clients expect
        logger.exception("stream %s failed", prepared.request_id)
        yield sse_error(EngineFailure("The server failed while streaming; the answer is incomplete."))
    yield _DONE
