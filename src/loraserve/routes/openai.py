"""OpenAI's front door: POST /v1/chat/completions and POST /v1/completions, JSON and SSE.

Each handler translates its body into the pipeline's ``GenerationRequest`` and
serializes what comes back; everything between is shared (routes/answer.py).
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable, Iterator
from typing import Any

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel

from loraserve.engine import TokenLogprob
from loraserve.errors import InvalidRequest, UnsupportedParameter, sse_error
from loraserve.events import StreamFailed, TextDelta, ToolCallsDelta, UsageReport, stream_events
from loraserve.generation import (
    ChatInput,
    FinishedChoice,
    GenerationRequest,
    PreparedRequest,
    TextInput,
)
from loraserve.protocol.requests import ChatCompletionRequest, ChatMessage, CompletionRequest, _SamplingFields
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
from loraserve.routes.answer import answer, hub_token
from loraserve.routes.shaping import chat_logprobs, completion_logprobs
from loraserve.services import Services, get_services
from loraserve.streams import PrimedStream
from loraserve.structured import response_format_constraint
from loraserve.tools import ParsedToolCall, plan_tools

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/v1")

_DONE = b"data: [DONE]\n\n"
MAX_PROMPTS = 64  # prompts in one /v1/completions request


def _usage(prompt: int, completion: int) -> Usage:
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _sse(payload: BaseModel) -> bytes:
    return b"data: " + payload.model_dump_json().encode() + b"\n\n"


_seen_unknown: set[str] = set()


def _log_unknown_fields(body: _SamplingFields) -> None:
    """Unknown fields are ignored, as OpenAI clients send new ones; say so once per field."""
    for name in body.model_extra or {}:
        if name not in _seen_unknown and len(_seen_unknown) < 256:
            _seen_unknown.add(name)
            logger.info("ignoring unknown request field %r (logged once)", name)


# -- chat ------------------------------------------------------------------


def chat_request(body: ChatCompletionRequest, token: str | None = None) -> GenerationRequest:
    """The pipeline's request for a chat body; tool and schema errors are 400s before any model is resolved."""
    _log_unknown_fields(body)
    tools = plan_tools(body)
    structured = response_format_constraint(body.response_format)
    if tools is not None and tools.constraint is not None:
        if structured is not None:
            raise InvalidRequest(
                "`response_format` cannot be combined with a tool_choice that forces a tool call.",
                param="response_format",
            )
        structured = tools.constraint
    return GenerationRequest(
        model=body.model,
        prompt=ChatInput([_message_dict(m) for m in body.messages], tools),
        sampling=body,
        id_prefix="chatcmpl",
        n=body.n,
        samples=body.n,
        max_tokens=body.token_limit(),
        max_tokens_param=body.token_limit_param(),
        structured=structured,
        adapter_source=body.adapter_source,
        hub_token=token,
        want_logprobs=body.logprobs,
        merged=body.merged_adapters.to_spec() if body.merged_adapters else None,
    )


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(
    body: ChatCompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | ChatCompletion:
    return await answer(
        request,
        services,
        chat_request(body, hub_token(body.api_token, request)),
        body.stream,
        lambda prepared, deltas, created: _chat_events(prepared, deltas, created, body.include_usage()),
        lambda prepared, done, created: ChatCompletion(
            id=prepared.request_id,
            created=created,
            model=prepared.target.name,
            choices=[_chat_choice(prepared, choice) for choice in done.choices],
            usage=_usage(done.prompt_tokens, done.completion_tokens),
        ),
    )


def _tool_calls(calls: list[ParsedToolCall]) -> list[ToolCall]:
    return [ToolCall(id=c.id, function=FunctionCall(name=c.name, arguments=c.arguments)) for c in calls]


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


async def _openai_stream(
    prepared: PreparedRequest,
    deltas: PrimedStream,
    include_usage: bool,
    usage_chunk: Callable[[Usage], BaseModel],
    choice_chunks: Callable[[TextDelta | ToolCallsDelta], Iterator[bytes]],
) -> AsyncGenerator[bytes, None]:
    """OpenAI's SSE: each choice's chunks, the usage chunk when asked, an in-band error if it fails, [DONE]."""
    async for event in stream_events(prepared, deltas):
        if isinstance(event, StreamFailed):
            yield sse_error(event.error)
            break
        if isinstance(event, UsageReport):
            if include_usage:
                yield _sse(usage_chunk(_usage(event.prompt_tokens, event.completion_tokens)))
            continue
        for chunk in choice_chunks(event):
            yield chunk
    yield _DONE


def _chat_events(
    prepared: PreparedRequest, deltas: PrimedStream, created: int, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    model = prepared.target.name

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

    started: set[int] = set()

    def choice_chunks(event: TextDelta | ToolCallsDelta) -> Iterator[bytes]:
        if event.index not in started:  # each choice's first chunk carries the role
            started.add(event.index)
            yield chunk(event.index, ChatDelta(role="assistant", content=""))
        if isinstance(event, ToolCallsDelta):
            tool_deltas = [
                DeltaToolCall(
                    index=i, id=c.id, type="function", function=DeltaFunctionCall(name=c.name, arguments=c.arguments)
                )
                for i, c in enumerate(event.calls)
            ]
            yield chunk(event.index, ChatDelta(tool_calls=tool_deltas), logprobs=event.logprobs)
            yield chunk(event.index, ChatDelta(), "tool_calls")
            return
        if event.text:
            yield chunk(event.index, ChatDelta(content=event.text), logprobs=event.logprobs)
        if event.finish_reason is not None:
            yield chunk(event.index, ChatDelta(), event.finish_reason)

    def usage_chunk(usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=prepared.request_id, created=created, model=model, choices=[], usage=usage)

    return _openai_stream(prepared, deltas, include_usage, usage_chunk, choice_chunks)


def _message_dict(message: ChatMessage) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        data["name"] = message.name
    if message.tool_calls:
        data["tool_calls"] = [
            {"id": call.id, "type": "function", "function": _function_for_template(call.function)}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        data["tool_call_id"] = message.tool_call_id
    return data


def _function_for_template(function: Any) -> dict[str, Any]:
    # Chat templates expect arguments as a mapping; OpenAI sends a JSON string.
    try:
        arguments: Any = json.loads(function.arguments) if function.arguments else {}
    except json.JSONDecodeError:
        arguments = function.arguments
    return {"name": function.name, "arguments": arguments}


# -- completions -------------------------------------------------------------


def completion_request(body: CompletionRequest, token: str | None = None) -> GenerationRequest:
    """The pipeline's request for a completions body; shape errors are 400s before any model is resolved."""
    _log_unknown_fields(body)
    if body.suffix:
        raise UnsupportedParameter("`suffix` (insertion) is not supported by this server.", param="suffix")
    if body.response_format is not None:
        raise UnsupportedParameter(
            "`response_format` (JSON mode) is only for /v1/chat/completions.", param="response_format"
        )
    prompts = _split_prompts(body.prompt)
    if not prompts:
        raise InvalidRequest("The prompt is empty.", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
    return GenerationRequest(
        model=body.model,
        prompt=TextInput(prompts),
        sampling=body,
        id_prefix="cmpl",
        n=body.n,
        samples=body.samples(),
        samples_param="best_of" if body.best_of else "n",
        max_tokens=body.max_tokens,
        adapter_source=body.adapter_source,
        hub_token=token,
        echo=body.echo,
        want_logprobs=body.logprobs is not None,
        merged=body.merged_adapters.to_spec() if body.merged_adapters else None,
    )


def _split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    items: list[Any] = list(prompt)
    if items and isinstance(items[0], int):
        return [items]
    return items


@router.post("/completions", response_model=Completion)
async def completions(
    body: CompletionRequest, request: Request, services: Services = Depends(get_services)
) -> Response | Completion:
    return await answer(
        request,
        services,
        completion_request(body, hub_token(body.api_token, request)),
        body.stream,
        lambda prepared, deltas, created: _completion_events(prepared, deltas, created, body.include_usage()),
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


def _completion_events(
    prepared: PreparedRequest, deltas: PrimedStream, created: int, include_usage: bool
) -> AsyncGenerator[bytes, None]:
    model = prepared.target.name

    def chunk(choice: CompletionChoice) -> bytes:
        return _sse(Completion(id=prepared.request_id, created=created, model=model, choices=[choice]))

    offsets: dict[int, int] = {}

    def choice_chunks(event: TextDelta | ToolCallsDelta) -> Iterator[bytes]:
        assert isinstance(event, TextDelta)  # completions have no tools
        if event.index not in offsets:
            offsets[event.index] = 0
            if prepared.echo:
                prompt_text, prompt_ids = _prompt_of(prepared, event.index)
                echoed = None
                if prepared.want_logprobs:
                    echoed = completion_logprobs(event.prompt_logprobs or [], _first_token_text(prepared, prompt_ids))
                yield chunk(CompletionChoice(index=event.index, text=prompt_text, finish_reason=None, logprobs=echoed))
                offsets[event.index] = len(prompt_text)
        if event.text or event.finish_reason or event.logprobs:
            logprobs = None
            if prepared.want_logprobs:
                logprobs = completion_logprobs(event.logprobs or [], None, offsets[event.index])
            offsets[event.index] += len(event.text)
            finish = event.finish_reason
            yield chunk(CompletionChoice(index=event.index, text=event.text, finish_reason=finish, logprobs=logprobs))

    def usage_chunk(usage: Usage) -> Completion:
        return Completion(id=prepared.request_id, created=created, model=model, choices=[], usage=usage)

    return _openai_stream(prepared, deltas, include_usage, usage_chunk, choice_chunks)
