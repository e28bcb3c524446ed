"""The one request pipeline behind every front door (OpenAI chat, OpenAI completions, LoRAX's generate).

A front door translates its body into a ``GenerationRequest``; ``Generator.prepare``
resolves the model (holding its adapter for as long as the ``async with`` lasts),
builds and counts the prompts, fits the context and asks the request for its
sampling options; ``complete`` and ``open_stream`` run it. This module knows no HTTP.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import anyio
from transformers import PreTrainedTokenizerBase

from loraserve import templates
from loraserve.adapters.merge import MergeSpec
from loraserve.adapters.ref import SourceKind
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
)
from loraserve.models import ModelCatalog, ModelTarget
from loraserve.shutdown import Drain
from loraserve.streams import PrimedStream, merge_streams
from loraserve.tools import ToolPlan

logger = logging.getLogger(__name__)


class SamplingSource(Protocol):
    """A request body that knows how it wants to be sampled, once the pipeline knows the room left."""

    def to_sampling_options(
        self, *, max_tokens: int, vocab_size: int, structured: StructuredOutput | None
    ) -> SamplingOptions: ...


@dataclass(frozen=True)
class ChatInput:
    """Messages to render with the model's chat template (and the tools it may call)."""

    messages: list[dict[str, Any]]
    tools: ToolPlan | None = None
    param: str = "messages"  # what an error about the prompt names


@dataclass(frozen=True)
class TextInput:
    """Prompts used as they are: strings or token ids."""

    prompts: list[str | list[int]]
    truncate: int | None = None  # keep only the last N prompt tokens (LoRAX's `truncate`)
    param: str = "prompt"


@dataclass(frozen=True)
class GenerationRequest:
    """What every front door's body becomes."""

    model: str
    prompt: ChatInput | TextInput
    sampling: SamplingSource
    id_prefix: str  # "chatcmpl", "cmpl", "gen": the response id's prefix
    n: int = 1  # choices returned per prompt
    samples: int = 1  # samples drawn per prompt (more than n with best_of)
    samples_param: str = "n"
    max_tokens: int | None = None  # None: what the context leaves
    max_tokens_param: str = "max_tokens"
    structured: StructuredOutput | None = None
    adapter_source: SourceKind = "hub"
    hub_token: str | None = None
    echo: bool = False
    want_logprobs: bool = False
    merged: MergeSpec | None = None  # LoRAX's merged_adapters: one LoRA made of several, for this request


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
    prepared_at: float = field(default_factory=time.monotonic)  # the model resolved, the prompt counted

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
    token_ids: list[int] = field(default_factory=list)
    stop_reason: int | str | None = None


@dataclass
class FinishedCompletion:
    choices: list[FinishedChoice]
    prompt_tokens: int
    completion_tokens: int
    ranked_out: list[FinishedChoice] = field(default_factory=list)  # best_of samples that were not kept


class Generator:
    def __init__(self, engine: Engine, catalog: ModelCatalog, max_n: int = 8, drain: Drain | None = None) -> None:
        self._engine = engine
        self._catalog = catalog
        self._max_n = max_n
        self._drain = drain

    # -- preparing --------------------------------------------------------

    @asynccontextmanager
    async def prepare(self, request: GenerationRequest) -> AsyncIterator[PreparedRequest]:
        """The engine requests for ``request``, with its model held until the ``async with`` ends."""
        self._check_n(request.samples, request.samples_param)
        resolving = self._catalog.resolve(request.model, request.adapter_source, request.hub_token, request.merged)
        async with resolving as target:
            prompt = request.prompt
            if isinstance(prompt, ChatInput):
                encoded = [await self._render_chat(target, prompt)]
            else:
                encoded = [await self._encode_prompt(target.chat.tokenizer, p, prompt.truncate) for p in prompt.prompts]
            room = min(
                self._room(len(ids), request.max_tokens, prompt.param, request.max_tokens_param) for ids, _ in encoded
            )
            options = request.sampling.to_sampling_options(
                max_tokens=room, vocab_size=len(target.chat.tokenizer), structured=request.structured
            )
            options, copies = _greedy_copies(options)
            response_id = f"{request.id_prefix}-{uuid.uuid4().hex}"
            if isinstance(prompt, ChatInput):
                calls = [EngineCall(response_id, *encoded[0])]
            else:  # one engine request per prompt, numbered within the response
                calls = [EngineCall(f"{response_id}-{i}", ids, text) for i, (ids, text) in enumerate(encoded)]
            tools = prompt.tools if isinstance(prompt, ChatInput) else None
            yield PreparedRequest(
                response_id, target, calls, options, request.n, request.echo, request.want_logprobs, tools, copies
            )

    async def _render_chat(self, target: ModelTarget, chat: ChatInput) -> tuple[list[int], str]:
        tool_specs = chat.tools.template_tools if chat.tools else None
        text = await templates.render_chat(target.chat, chat.messages, tool_specs)
        # The template already wrote any BOS/special tokens it wants.
        encoded = await anyio.to_thread.run_sync(lambda: target.chat.tokenizer(text, add_special_tokens=False))
        return list(encoded["input_ids"]), ""

    def _check_n(self, n: int, param: str) -> None:
        if n > self._max_n:
            raise InvalidRequest(
                f"`{param}` is {n}, above this server's limit of {self._max_n} (--max-n).", param=param
            )

    async def _encode_prompt(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str | list[int], truncate: int | None = None
    ) -> tuple[list[int], str]:
        if isinstance(prompt, str):
            ids = list(await anyio.to_thread.run_sync(lambda: tokenizer(prompt)["input_ids"]))
            if not ids:
                raise InvalidRequest("The prompt is empty.", param="prompt")
            if truncate is not None and len(ids) > truncate:
                ids = ids[-truncate:]
                return ids, str(tokenizer.decode(ids))
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

    # -- running ----------------------------------------------------------

    async def complete(self, prepared: PreparedRequest) -> FinishedCompletion:
        per_call = prepared.samples_per_call
        choices = {(c, i): FinishedChoice(index=i) for c in range(len(prepared.calls)) for i in range(per_call)}
        completion_tokens = 0
        async with aclosing(self._deltas(prepared)) as deltas:
            async for call_index, delta in deltas:
                choice = choices[(call_index, delta.index)]
                choice.text += delta.text
                choice.token_ids.extend(delta.token_ids)
                choice.stop_reason = delta.stop_reason if delta.finish_reason else choice.stop_reason
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
        ranked_out: list[FinishedChoice] = []
        for c in range(len(prepared.calls)):
            group = [choices[(c, i)] for i in range(per_call)]
            if per_call > prepared.n:  # best_of: keep the n most likely samples
                group.sort(
                    key=lambda ch: float("-inf") if ch.cumulative_logprob is None else ch.cumulative_logprob,
                    reverse=True,
                )
                group, dropped = group[: prepared.n], group[prepared.n :]
                ranked_out.extend(dropped)
            for local, choice in enumerate(group):
                choice.index = prepared.choice_index(c, local)
                ordered.append(choice)
        return FinishedCompletion(ordered, prepared.prompt_tokens, completion_tokens, ranked_out)

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
            async with aclosing(merge_streams(streams)) as merged:
                # A stopping server ends what is still running at its deadline (one place for every door).
                source = merged if self._drain is None else self._drain.until_expired(merged)
                async for call_index, delta in source:
                    prepared.progress.add(len(delta.token_ids) * prepared.copies)
                    for copy in range(prepared.copies):
                        yield call_index, delta if copy == 0 else replace(delta, index=copy)
        except EngineRejected as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except EngineDead as exc:
            raise EngineUnavailable.engine_down() from exc
        except EngineBusy as exc:
            raise ServerBusy("The server is at its queue limit; try again shortly.") from exc
        except (InvalidRequest, EngineUnavailable, EngineFailure):
            raise
        except Exception as exc:
            logger.exception("generation %s failed", prepared.request_id)
            raise EngineFailure("The engine failed while generating; the request was not completed.") from exc


def _greedy_copies(options: SamplingOptions) -> tuple[SamplingOptions, int]:
    """Greedy decoding gives every sample the same answer, and vLLM refuses n > 1 with it:
    ask the engine once and copy, as OpenAI returns n identical choices."""
    if options.temperature == 0 and options.n > 1:
        return replace(options, n=1), options.n
    return options, 1
