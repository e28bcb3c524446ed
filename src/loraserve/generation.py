"""From a validated OpenAI request to engine output: prompts, limits, sampling, errors.

Routes call this and only shape the answer; this module knows no HTTP.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
from transformers import PreTrainedTokenizerBase

from loraserve import templates
from loraserve.engine import (
    CompletionDelta,
    Engine,
    EngineBusy,
    EngineDead,
    EngineRejected,
    FinishReason,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)
from loraserve.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    InvalidRequest,
    ServerBusy,
    UnsupportedParameter,
)
from loraserve.models import ModelCatalog, ModelTarget
from loraserve.protocol.requests import ChatCompletionRequest, CompletionRequest, _SamplingFields
from loraserve.shutdown import Drain
from loraserve.structured import response_format_constraint
from loraserve.tools import ToolPlan, plan_tools

logger = logging.getLogger(__name__)

MAX_PROMPTS = 64  # prompts in one /v1/completions request


@dataclass(frozen=True)
class EngineCall:
    """One engine request: one prompt, ``options.n`` samples."""

    request_id: str
    prompt_token_ids: list[int]
    prompt_text: str


@dataclass
class TokenProgress:
    """Counted as tokens come out of the engine, for logs and metrics (plain and streamed answers alike)."""

    completion_tokens: int = 0
    first_token_at: float | None = None  # time.monotonic() of the first generated token

    def add(self, tokens: int) -> None:
        if tokens and self.first_token_at is None:
            self.first_token_at = time.monotonic()
        self.completion_tokens += tokens


@dataclass
class PreparedRequest:
    request_id: str
    target: ModelTarget
    calls: list[EngineCall]
    options: SamplingOptions
    n: int  # choices returned per prompt (fewer than options.n with best_of)
    echo: bool = False
    want_logprobs: bool = False
    tools: ToolPlan | None = None
    copies: int = 1  # greedy n > 1: the engine samples once, every choice gets a copy
    progress: TokenProgress = field(default_factory=TokenProgress)

    @property
    def samples_per_call(self) -> int:
        return self.options.n * self.copies

    @property
    def prompt_tokens(self) -> int:
        return sum(len(call.prompt_token_ids) for call in self.calls)

    def choice_index(self, call: int, local: int) -> int:
        return call * self.n + local


@dataclass
class FinishedChoice:
    index: int
    text: str = ""
    finish_reason: FinishReason | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None


@dataclass
class FinishedCompletion:
    choices: list[FinishedChoice]
    prompt_tokens: int
    completion_tokens: int


class Generator:
    def __init__(self, engine: Engine, catalog: ModelCatalog, max_n: int = 8, drain: Drain | None = None) -> None:
        self._engine = engine
        self._catalog = catalog
        self._max_n = max_n
        self._drain = drain

    # -- preparing --------------------------------------------------------

    @asynccontextmanager
    async def prepare_chat(
        self, body: ChatCompletionRequest, hub_token: str | None = None
    ) -> AsyncIterator[PreparedRequest]:
        """The engine request for a chat body, with its model held until the ``async with`` ends."""
        _log_unknown_fields(body)
        self._check_n(body.n, "n")
        tools = plan_tools(body)
        structured = response_format_constraint(body.response_format)
        if tools is not None and tools.constraint is not None:
            if structured is not None:
                raise InvalidRequest(
                    "`response_format` cannot be combined with a tool_choice that forces a tool call.",
                    param="response_format",
                )
            structured = tools.constraint
        async with self._catalog.resolve(body.model, body.adapter_source, hub_token) as target:
            messages = [_message_dict(m) for m in body.messages]
            tool_specs = tools.template_tools if tools else None
            text = await templates.render_chat(target.chat, messages, tool_specs)
            # The template already wrote any BOS/special tokens it wants.
            encoded = await anyio.to_thread.run_sync(lambda: target.chat.tokenizer(text, add_special_tokens=False))
            prompt_ids = list(encoded["input_ids"])
            top = body.top_logprobs or 0
            options = self._options(
                body,
                target.chat.tokenizer,
                self._room(len(prompt_ids), body.token_limit(), "messages", body.token_limit_param()),
                n=body.n,
                logprobs=top if body.logprobs else None,
                structured=structured,
            )
            options, copies = _greedy_copies(options)
            call = EngineCall(f"chatcmpl-{uuid.uuid4().hex}", prompt_ids, "")
            yield PreparedRequest(call.request_id, target, [call], options, body.n, False, body.logprobs, tools, copies)

    @asynccontextmanager
    async def prepare_completion(
        self, body: CompletionRequest, hub_token: str | None = None
    ) -> AsyncIterator[PreparedRequest]:
        """The engine requests for a completions body, with its model held until the ``async with`` ends."""
        _log_unknown_fields(body)
        if body.suffix:
            raise UnsupportedParameter("`suffix` (insertion) is not supported by this server.", param="suffix")
        if body.response_format is not None:
            raise UnsupportedParameter(
                "`response_format` (JSON mode) is only for /v1/chat/completions.", param="response_format"
            )
        samples = body.best_of or body.n
        self._check_n(samples, "best_of" if body.best_of else "n")
        prompts = _split_prompts(body.prompt)
        if not prompts:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        if len(prompts) > MAX_PROMPTS:
            raise InvalidRequest(f"At most {MAX_PROMPTS} prompts per request.", param="prompt")
        async with self._catalog.resolve(body.model, body.adapter_source, hub_token) as target:
            tokenizer = target.chat.tokenizer
            encoded = [await self._encode_prompt(tokenizer, p) for p in prompts]
            room = min(self._room(len(ids), body.max_tokens, "prompt", "max_tokens") for ids, _ in encoded)
            ranking = samples > body.n  # best_of: rank samples by their cumulative logprob
            logprobs = body.logprobs if body.logprobs is not None else (0 if ranking else None)
            options = self._options(
                body,
                tokenizer,
                room,
                n=samples,
                logprobs=logprobs,
                prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None else None,
            )
            options, copies = _greedy_copies(options)
            response_id = f"cmpl-{uuid.uuid4().hex}"
            calls = [EngineCall(f"{response_id}-{i}", ids, text) for i, (ids, text) in enumerate(encoded)]
            yield PreparedRequest(
                response_id, target, calls, options, body.n, body.echo, body.logprobs is not None, None, copies
            )

    def _check_n(self, n: int, param: str) -> None:
        if n > self._max_n:
            raise InvalidRequest(
                f"`{param}` is {n}, above this server's limit of {self._max_n} (--max-n).", param=param
            )

    async def _encode_prompt(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str | list[int]
    ) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            ids = list(await anyio.to_thread.run_sync(lambda: tokenizer(prompt)["input_ids"]))
            if not ids:
                raise InvalidRequest("The prompt is empty.", param="prompt")
            return ids, prompt
        vocab = len(tokenizer)
        bad = [t for t in prompt if t >= vocab]
        if bad:
            raise InvalidRequest(f"Token id {bad[0]} is outside the vocabulary (size {vocab}).", param="prompt")
        return list(prompt), str(tokenizer.decode(prompt))

    def _room(self, prompt_len: int, requested_max: int | None, prompt_param: str, max_param: str) -> int:
        """max_tokens: what the request asked for, or what the context leaves.

        The error names what the user must change: the prompt when it alone fills the context,
        else the max-tokens parameter they set.
        """
        limit = self._engine.max_model_len
        room = limit - prompt_len
        if room <= 0:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens, and the {prompt_param} alone has "
                f"{prompt_len}. Please shorten the {prompt_param}.",
                param=prompt_param,
            )
        if requested_max is not None and requested_max > room:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + requested_max} tokens ({prompt_len} in the {prompt_param}, {requested_max} in the "
                f"completion). Please reduce `{max_param}` to at most {room}, or shorten the {prompt_param}.",
                param=max_param,
            )
        return requested_max if requested_max is not None else room

    def _options(
        self,
        body: _SamplingFields,
        tokenizer: PreTrainedTokenizerBase,
        max_tokens: int,
        *,
        n: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        structured: StructuredOutput | None = None,
    ) -> SamplingOptions:
        if body.min_tokens > max_tokens:
            raise InvalidRequest(
                f"`min_tokens` ({body.min_tokens}) is above max_tokens ({max_tokens}).", param="min_tokens"
            )
        return SamplingOptions(
            max_tokens=max_tokens,
            n=n,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=0 if body.top_k is None else body.top_k,
            min_p=0.0 if body.min_p is None else body.min_p,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            stop=body.stop_list(),
            seed=body.seed,
            logit_bias=_logit_bias(body.logit_bias, len(tokenizer)),
            min_tokens=body.min_tokens,
            ignore_eos=body.ignore_eos,
            skip_special_tokens=body.skip_special_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            structured=structured,
        )

    # -- running ----------------------------------------------------------

    async def complete(self, prepared: PreparedRequest) -> FinishedCompletion:
        per_call = prepared.samples_per_call
        choices = {(c, i): FinishedChoice(index=i) for c in range(len(prepared.calls)) for i in range(per_call)}
        completion_tokens = 0
        async with aclosing(self._deltas(prepared)) as deltas:
            async for call_index, delta in deltas:
                choice = choices[(call_index, delta.index)]
                choice.text += delta.text
                completion_tokens += len(delta.token_ids)
                choice.logprobs.extend(delta.logprobs or ())
                choice.finish_reason = delta.finish_reason or choice.finish_reason
                if delta.prompt_logprobs is not None:
                    choice.prompt_logprobs = delta.prompt_logprobs
                if delta.cumulative_logprob is not None:
                    choice.cumulative_logprob = delta.cumulative_logprob
        if any(choice.finish_reason is None for choice in choices.values()):
            raise EngineFailure("The engine ended the request without a finish reason.")
        ordered: list[FinishedChoice] = []
        for c in range(len(prepared.calls)):
            group = [choices[(c, i)] for i in range(per_call)]
            if per_call > prepared.n:  # best_of: keep the n most likely samples
                group.sort(
                    key=lambda ch: float("-inf") if ch.cumulative_logprob is None else ch.cumulative_logprob,
                    reverse=True,
                )
                group = group[: prepared.n]
            for local, choice in enumerate(group):
                choice.index = prepared.choice_index(c, local)
                ordered.append(choice)
        return FinishedCompletion(ordered, prepared.prompt_tokens, completion_tokens)

    async def open_stream(self, prepared: PreparedRequest) -> PrimedStream:
        """Start generating and wait for the first delta, so that errors the engine
        raises at admission still become a proper HTTP status, not an in-band error.
        Deltas come out with their response-wide choice index."""
        deltas = self._indexed(prepared)
        try:
            first = await deltas.__anext__()
        except BaseException:
            await deltas.aclose()
            raise
        return PrimedStream(first, deltas)

    async def _indexed(self, prepared: PreparedRequest) -> AsyncGenerator[CompletionDelta, None]:
        # aclosing: closing this generator early must close (and so abort) the ones it reads.
        async with aclosing(self._deltas(prepared)) as deltas:
            async for call_index, delta in deltas:
                delta.index = prepared.choice_index(call_index, delta.index)
                yield delta

    async def _deltas(self, prepared: PreparedRequest) -> AsyncGenerator[tuple[int, CompletionDelta], None]:
        streams = [
            self._engine.generate(call.request_id, call.prompt_token_ids, prepared.options, prepared.target.lora)
            for call in prepared.calls
        ]
        try:
            async with aclosing(_merge(streams)) as merged:
                # A stopping server ends what is still running at its deadline (one place for every door).
                source = merged if self._drain is None else self._drain.until_expired(merged)
                async for call_index, delta in source:
                    prepared.progress.add(len(delta.token_ids) * prepared.copies)
                    for copy in range(prepared.copies):
                        yield call_index, delta if copy == 0 else replace(delta, index=copy)
        except EngineRejected as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except EngineDead as exc:
            raise EngineUnavailable("The inference engine is not available; try again later.") from exc
        except EngineBusy as exc:
            raise ServerBusy("The server is at its queue limit; try again shortly.") from exc
        except (InvalidRequest, EngineUnavailable, EngineFailure):
            raise
        except Exception as exc:
            logger.exception("generation %s failed", prepared.request_id)
            raise EngineFailure("The engine failed while generating; the request was not completed.") from exc


async def _merge(
    streams: list[AsyncGenerator[CompletionDelta, None]],
) -> AsyncGenerator[tuple[int, CompletionDelta], None]:
    """Interleave several engine streams; closing the merge closes (and so aborts) them all."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for delta in only:
                yield 0, delta
        return
    queue: asyncio.Queue[tuple[int, CompletionDelta | None, BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncGenerator[CompletionDelta, None]) -> None:
        try:
            async for delta in stream:
                await queue.put((index, delta, None))
            await queue.put((index, None, None))
        except Exception as exc:  # handed to the consumer, which re-raises it
            await queue.put((index, None, exc))
        finally:
            await stream.aclose()

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(streams)
    try:
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is None:
                remaining -= 1
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class PrimedStream:
    """An engine stream whose first delta has already arrived.

    ``aclose()`` always closes (and so aborts) the underlying stream, even when
    iteration never started, unlike an async generator's.
    """

    def __init__(self, first: CompletionDelta, rest: AsyncGenerator[CompletionDelta, None]) -> None:
        self._first: CompletionDelta | None = first
        self._rest = rest

    def __aiter__(self) -> PrimedStream:
        return self

    async def __anext__(self) -> CompletionDelta:
        if self._first is not None:
            first, self._first = self._first, None
            return first
        return await self._rest.__anext__()

    async def aclose(self) -> None:
        self._first = None
        await self._rest.aclose()


def _greedy_copies(options: SamplingOptions) -> tuple[SamplingOptions, int]:
    """Greedy decoding gives every sample the same answer, and vLLM refuses n > 1 with it:
    ask the engine once and copy, as OpenAI returns n identical choices."""
    if options.temperature == 0 and options.n > 1:
        return replace(options, n=1), options.n
    return options, 1


_seen_unknown: set[str] = set()


def _log_unknown_fields(body: _SamplingFields) -> None:
    """Unknown fields are ignored, as OpenAI clients send new ones; say so once per field."""
    for name in body.model_extra or {}:
        if name not in _seen_unknown and len(_seen_unknown) < 256:
            _seen_unknown.add(name)
            logger.info("ignoring unknown request field %r (logged once)", name)


def _split_prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    items: list[Any] = list(prompt)
    if items and isinstance(items[0], int):
        return [items]
    return items


def _logit_bias(bias: dict[str, float] | None, vocab: int) -> tuple[tuple[int, float], ...]:
    if not bias:
        return ()
    pairs = []
    for key, value in bias.items():
        if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab:
            raise InvalidRequest(
                f"logit_bias key {key!r} is not a token id of this model (0..{vocab - 1}).", param="logit_bias"
            )
        pairs.append((int(key), float(value)))
    return tuple(pairs)


def _message_dict(message: Any) -> dict[str, Any]:
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
    import json

    try:
        arguments: Any = json.loads(function.arguments) if function.arguments else {}
    except json.JSONDecodeError:
        arguments = function.arguments
    return {"name": function.name, "arguments": arguments}
