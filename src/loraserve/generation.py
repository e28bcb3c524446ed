"""From a validated OpenAI request to engine output: prompt, limits, sampling, errors.

Routes call this and only shape the answer; this module knows no HTTP.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import anyio
from transformers import PreTrainedTokenizerBase

from loraserve import templates
from loraserve.engine import (
    CompletionDelta,
    Engine,
    EngineDead,
    EngineRejected,
    FinishReason,
    SamplingOptions,
)
from loraserve.errors import (
    ContextLengthExceeded,
    EngineFailure,
    EngineUnavailable,
    InvalidRequest,
    UnsupportedParameter,
)
from loraserve.models import ModelCatalog, ModelTarget
from loraserve.protocol.requests import ChatCompletionRequest, CompletionRequest, _SamplingFields
from loraserve.templates import ChatFormat

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    target: ModelTarget
    prompt_token_ids: list[int]
    options: SamplingOptions

    def release(self) -> None:
        self.target.release()


@dataclass
class FinishedCompletion:
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int


@dataclass
class StreamCounter:
    """Running token count of a stream, for its final usage chunk."""

    completion_tokens: int = 0
    finish_reason: FinishReason | None = field(default=None)


class Generator:
    def __init__(self, engine: Engine, catalog: ModelCatalog) -> None:
        self._engine = engine
        self._catalog = catalog

    # -- preparing --------------------------------------------------------

    async def prepare_chat(self, body: ChatCompletionRequest, hub_token: str | None = None) -> PreparedRequest:
        _reject_unsupported(body)
        target = await self._catalog.resolve(body.model, body.adapter_source, hub_token)
        try:
            messages = [_message_dict(m) for m in body.messages]
            prompt_ids = await anyio.to_thread.run_sync(self._render_and_encode, target.chat, messages)
            return self._prepared("chatcmpl", target, prompt_ids, body, body.token_limit(), "messages")
        except BaseException:
            target.release()
            raise

    async def prepare_completion(self, body: CompletionRequest, hub_token: str | None = None) -> PreparedRequest:
        _reject_unsupported(body)
        _reject_unsupported_completion(body)
        target = await self._catalog.resolve(body.model, body.adapter_source, hub_token)
        try:
            prompt_ids = await self._completion_prompt_ids(target.chat.tokenizer, body.prompt)
            return self._prepared("cmpl", target, prompt_ids, body, body.max_tokens, "prompt")
        except BaseException:
            target.release()
            raise

    def _render_and_encode(self, chat: ChatFormat, messages: list[dict[str, Any]]) -> list[int]:
        text = templates.render_chat(chat, messages)
        # The template already wrote any BOS/special tokens it wants.
        return list(chat.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def _completion_prompt_ids(
        self, tokenizer: PreTrainedTokenizerBase, prompt: str | list[str] | list[int] | list[list[int]]
    ) -> list[int]:
        prompts: list[Any] = [prompt] if isinstance(prompt, str) else list(prompt)
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]
        if len(prompts) != 1:
            raise UnsupportedParameter("Only one prompt per request is supported yet.", param="prompt")
        only = prompts[0]
        if isinstance(only, str):
            encoded = await anyio.to_thread.run_sync(lambda: tokenizer(only)["input_ids"])
            ids = list(encoded)
        else:
            ids = list(only)
            vocab = len(tokenizer)
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidRequest(f"Token id {bad[0]} is outside the vocabulary (size {vocab}).", param="prompt")
        if not ids:
            raise InvalidRequest("The prompt is empty.", param="prompt")
        return ids

    def _prepared(
        self,
        prefix: str,
        target: ModelTarget,
        prompt_ids: list[int],
        body: _SamplingFields,
        requested_max: int | None,
        prompt_param: str,
    ) -> PreparedRequest:
        limit = self._engine.max_model_len
        room = limit - len(prompt_ids)
        if room <= 0 or (requested_max is not None and requested_max > room):
            asked = requested_max if requested_max is not None else 1
            raise ContextLengthExceeded(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{len(prompt_ids) + asked} tokens ({len(prompt_ids)} in the {prompt_param}, "
                f"{asked} in the completion). Please reduce the length of the {prompt_param} or completion.",
                param=prompt_param,
            )
        options = SamplingOptions(
            max_tokens=requested_max if requested_max is not None else room,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            stop=body.stop_list(),
            seed=body.seed,
        )
        return PreparedRequest(f"{prefix}-{uuid.uuid4().hex}", target, prompt_ids, options)

    # -- running ----------------------------------------------------------

    async def complete(self, prepared: PreparedRequest) -> FinishedCompletion:
        parts: list[str] = []
        tokens = 0
        reason: FinishReason | None = None
        async for delta in self._deltas(prepared):
            parts.append(delta.text)
            tokens += len(delta.token_ids)
            reason = delta.finish_reason or reason
        if reason is None:
            raise EngineFailure("The engine ended the request without a finish reason.")
        return FinishedCompletion("".join(parts), reason, len(prepared.prompt_token_ids), tokens)

    async def open_stream(self, prepared: PreparedRequest) -> AsyncGenerator[CompletionDelta, None]:
        """Start generating and wait for the first delta, so that errors the engine
        raises at admission still become a proper HTTP status, not an in-band error."""
        deltas = self._deltas(prepared)
        try:
            first = await deltas.__anext__()
        except BaseException:
            await deltas.aclose()
            raise
        return _prepend(first, deltas)

    async def _deltas(self, prepared: PreparedRequest) -> AsyncGenerator[CompletionDelta, None]:
        stream = self._engine.generate(
            prepared.request_id, prepared.prompt_token_ids, prepared.options, prepared.target.lora
        )
        try:
            async for delta in stream:
                yield delta
        except EngineRejected as exc:
            raise InvalidRequest(str(exc), param=exc.param) from exc
        except EngineDead as exc:
            raise EngineUnavailable("The inference engine is not available; try again later.") from exc
        except (InvalidRequest, EngineUnavailable, EngineFailure):
            raise
        except Exception as exc:
            logger.exception("generation %s failed", prepared.request_id)
            raise EngineFailure("The engine failed while generating; the request was not completed.") from exc
        finally:
            await stream.aclose()
            prepared.release()


async def _prepend(
    first: CompletionDelta, rest: AsyncGenerator[CompletionDelta, None]
) -> AsyncGenerator[CompletionDelta, None]:
    try:
        yield first
        async for delta in rest:
            yield delta
    finally:
        await rest.aclose()


def _reject_unsupported_completion(body: CompletionRequest) -> None:
    if body.echo:
        raise UnsupportedParameter("`echo` is not supported yet.", param="echo")
    if body.logprobs is not None:
        raise UnsupportedParameter("`logprobs` is not supported yet.", param="logprobs")
    if body.best_of not in (None, 1):
        raise UnsupportedParameter("`best_of` other than 1 is not supported yet.", param="best_of")
    if body.suffix:
        raise UnsupportedParameter("`suffix` (insertion) is not supported by this model.", param="suffix")


def _reject_unsupported(body: _SamplingFields) -> None:
    if body.n != 1:
        raise UnsupportedParameter("`n` other than 1 is not supported yet.", param="n")


def _message_dict(message: Any) -> dict[str, Any]:
    data: dict[str, Any] = {"role": message.role, "content": message.text()}
    if message.name is not None:
        data["name"] = message.name
    return data
