"""LoRAX's front door: POST /generate, /generate_stream, / (what lorax-client calls) and /tokenize.

The body becomes the same ``GenerationRequest`` as an OpenAI completion (the same
adapter resolution, cache, limits and errors), and the answer is written as LoRAX
writes it: ``generated_text`` and ``details`` (tokens with logprobs and
alternatives, the prefill, best_of sequences), token events then a final one
carrying the whole text, and LoRAX's ``x-*`` headers. Errors are LoRAX-shaped
(``errors.LORAX_PATHS``).
"""

from __future__ import annotations

import json
import math
import time
import weakref
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from transformers import PreTrainedTokenizerBase

from loraserve.engine import SamplingOptions, StructuredOutput, TokenLogprob
from loraserve.errors import InvalidRequest, lorax_error_body
from loraserve.events import StreamFailed, TextDelta, stream_events
from loraserve.generation import FinishedChoice, FinishedCompletion, GenerationRequest, PreparedRequest, TextInput
from loraserve.observe import request_record
from loraserve.protocol.lorax import LoraxGenerateRequest, LoraxParameters, TokenizeRequest
from loraserve.routes.answer import answer, hub_token
from loraserve.services import Services, get_services
from loraserve.streams import PrimedStream

router = APIRouter()


@dataclass(frozen=True)
class _Sampling:
    """LoRAX's parameters as the pipeline's sampling source (a stream needs every token's logprob)."""

    parameters: LoraxParameters
    stream: bool

    def to_sampling_options(
        self, *, max_tokens: int, vocab_size: int, structured: StructuredOutput | None
    ) -> SamplingOptions:
        return self.parameters.to_sampling_options(
            max_tokens=max_tokens, vocab_size=vocab_size, structured=structured, stream=self.stream
        )


def generation_request(body: LoraxGenerateRequest, stream: bool, token: str | None) -> GenerationRequest:
    params = body.parameters
    params.check_supported()
    if stream and params.decoder_input_details:
        raise InvalidRequest(
            "`decoder_input_details` == true is not supported when streaming tokens", param="decoder_input_details"
        )
    if stream and params.samples() > 1:
        raise InvalidRequest("`best_of` != 1 is not supported when `stream` == True", param="best_of")
    return GenerationRequest(
        model=params.adapter_id or "",
        prompt=TextInput([body.inputs], truncate=params.truncate, param="inputs"),
        sampling=_Sampling(params, stream),
        id_prefix="gen",
        n=1,
        samples=params.samples(),
        samples_param="best_of",
        max_tokens=params.max_new_tokens,
        max_tokens_param="max_new_tokens",
        structured=params.structured(),
        adapter_source=params.source(),
        hub_token=token,
        merged=params.merged_adapters.to_spec() if params.merged_adapters else None,
    )


@router.post("/generate")
async def generate(
    body: LoraxGenerateRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    return await _generate(body, request, services, stream=False, as_list=False)


@router.post("/generate_stream")
async def generate_stream(
    body: LoraxGenerateRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    return await _generate(body, request, services, stream=True, as_list=False)


@router.post("/")
async def compat_generate(
    body: LoraxGenerateRequest, request: Request, services: Services = Depends(get_services)
) -> Response:
    """lorax-client's route: a JSON list holding one answer, or the stream when ``stream`` is true."""
    return await _generate(body, request, services, stream=body.stream, as_list=True)


async def _generate(
    body: LoraxGenerateRequest, request: Request, services: Services, *, stream: bool, as_list: bool
) -> Response:
    params = body.parameters
    generation = generation_request(body, stream, hub_token(params.api_token, request))
    started = request_record(request).started
    base_name = services.catalog.base.served_name  # LoRAX's x-model-id names the base, whatever the adapter
    return await answer(
        request,
        services,
        generation,
        stream,
        lambda prepared, deltas, _: _token_events(prepared, deltas, body),
        lambda prepared, done, _: _plain(prepared, done, body, started, as_list, base_name),
        lambda prepared: _headers(prepared, body, base_name),
    )


# -- shaping ------------------------------------------------------------------


def _finish_reason(choice_reason: str | None, stop_reason: int | str | None) -> str:
    if choice_reason == "length":
        return "length"
    return "stop_sequence" if isinstance(stop_reason, str) else "eos_token"


# Token ids each tokenizer calls special: `all_special_ids` builds a new list on every access, and a stream
# asks once per token. Weak keys: an evicted adapter's tokenizer is not kept alive by this.
_SPECIAL_IDS: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, frozenset[int]] = weakref.WeakKeyDictionary()


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    ids = _SPECIAL_IDS.get(tokenizer)
    if ids is None:
        ids = _SPECIAL_IDS[tokenizer] = frozenset(tokenizer.all_special_ids)
    return ids


def _finite(logprob: float) -> float:
    """JSON has no -Infinity; OpenAI writes an impossible token's logprob as -9999.0, and so does this."""
    return logprob if math.isfinite(logprob) else -9999.0


def _token(prepared: PreparedRequest, token_id: int, text: str, logprob: TokenLogprob | None) -> dict[str, Any]:
    token: dict[str, Any] = {
        "id": token_id,
        "text": logprob.token if logprob is not None else text,
        "logprob": _finite(logprob.logprob) if logprob is not None else 0.0,
        "special": token_id in _special_ids(prepared.target.chat.tokenizer),
    }
    if logprob is not None and logprob.top:
        token["alternative_tokens"] = [{"id": i, "text": t, "logprob": _finite(lp)} for i, t, lp in logprob.top]
    return token


def _tokens(prepared: PreparedRequest, choice: FinishedChoice) -> list[dict[str, Any]]:
    logprobs: list[TokenLogprob | None] = list(choice.logprobs) or [None] * len(choice.token_ids)
    return [_token(prepared, tid, "", lp) for tid, lp in zip(choice.token_ids, logprobs, strict=False)]


def _prefill(prepared: PreparedRequest, choice: FinishedChoice) -> list[dict[str, Any]]:
    if choice.prompt_logprobs is None:
        return []
    tokenizer = prepared.target.chat.tokenizer
    ids = prepared.calls[0].prompt_token_ids
    return [
        {
            "id": tid,
            "text": lp.token if lp else str(tokenizer.decode([tid])),
            "logprob": _finite(lp.logprob) if lp else None,
        }
        for tid, lp in zip(ids, choice.prompt_logprobs, strict=False)
    ]


def _sequence(
    prepared: PreparedRequest, choice: FinishedChoice, body: LoraxGenerateRequest, seed: int | None
) -> dict[str, Any]:
    return {
        "generated_text": _full_text(body, choice.text),
        "finish_reason": _finish_reason(choice.finish_reason, choice.stop_reason),
        "generated_tokens": len(choice.token_ids),
        "seed": seed,
        "prefill": _prefill(prepared, choice),
        "tokens": _tokens(prepared, choice),
    }


def _full_text(body: LoraxGenerateRequest, text: str) -> str:
    return body.inputs + text if body.parameters.return_full_text else text


def _seed(prepared: PreparedRequest) -> int | None:
    return prepared.options.seed if prepared.options.temperature > 0 else None


def _plain(
    prepared: PreparedRequest,
    done: FinishedCompletion,
    body: LoraxGenerateRequest,
    started: float,
    as_list: bool,
    base_name: str,
) -> Response:
    params = body.parameters
    best = done.choices[0]
    answer_body: dict[str, Any] = {"generated_text": _full_text(body, best.text)}
    if params.details or params.decoder_input_details:
        details = _sequence(prepared, best, body, _seed(prepared))
        del details["generated_text"]
        details["prompt_tokens"] = done.prompt_tokens
        if done.ranked_out:
            details["best_of_sequences"] = [_sequence(prepared, c, body, _seed(prepared)) for c in done.ranked_out]
        answer_body["details"] = details
    headers = {
        **_headers(prepared, body, base_name),
        **_timings(prepared, started, len(best.token_ids), done.prompt_tokens),
    }
    return JSONResponse([answer_body] if as_list else answer_body, headers=headers)


def _headers(prepared: PreparedRequest, body: LoraxGenerateRequest, base_name: str) -> dict[str, str]:
    params = body.parameters
    headers = {"x-model-id": base_name, "x-compute-characters": str(len(body.inputs))}
    adapters = params.merged_adapters.ids if params.merged_adapters else [params.adapter_id or ""]
    if any(adapters) and prepared.target.lora is not None:
        headers["x-adapter-id"] = ",".join(adapters)
        headers["x-adapter-source"] = params.adapter_source or "hub"
    return headers


def _timings(prepared: PreparedRequest, started: float, generated: int, prompt: int) -> dict[str, str]:
    now = time.monotonic()
    first = prepared.progress.first_token_at or now
    total_ms = int((now - started) * 1000)
    validation_ms = int((prepared.prepared_at - started) * 1000)
    queue_ms = int((first - prepared.prepared_at) * 1000)  # waiting for the engine, and the prefill
    inference_ms = int((now - first) * 1000)
    return {
        "x-compute-time": str(total_ms),
        "x-total-time": str(total_ms),
        "x-validation-time": str(validation_ms),
        "x-queue-time": str(queue_ms),
        "x-inference-time": str(inference_ms),
        "x-time-per-token": str(inference_ms // max(1, generated)),
        "x-prompt-tokens": str(prompt),
        "x-generated-tokens": str(generated),
        "x-total-tokens": str(prompt + generated),
    }


def _event(payload: dict[str, Any]) -> bytes:
    return b"data:" + json.dumps(payload).encode() + b"\n\n"


async def _token_events(
    prepared: PreparedRequest, deltas: PrimedStream, body: LoraxGenerateRequest
) -> AsyncGenerator[bytes, None]:
    """One event per token; the last also carries the whole text and, with ``details``, the summary.

    Each token event is held until the next is known, so the final one can carry the end.
    """
    text = ""
    generated = 0
    pending: dict[str, Any] | None = None
    async for event in stream_events(prepared, deltas):
        if isinstance(event, StreamFailed):
            yield _event(lorax_error_body(event.error))
            return
        if not isinstance(event, TextDelta):
            continue
        text += event.text
        logprobs: list[TokenLogprob | None] = list(event.logprobs or ()) or [None] * len(event.token_ids)
        for position, (tid, lp) in enumerate(zip(event.token_ids, logprobs, strict=False)):
            if pending is not None:
                yield _event({"token": pending, "generated_text": None, "details": None})
            last = position == len(event.token_ids) - 1
            pending = _token(prepared, tid, event.text if last and lp is None else "", lp)
            generated += 1
        if event.finish_reason is not None and pending is not None:
            details = None
            if body.parameters.details:
                details = {
                    "finish_reason": _finish_reason(event.finish_reason, event.stop_reason),
                    "prompt_tokens": prepared.prompt_tokens,
                    "generated_tokens": generated,
                    "seed": _seed(prepared),
                }
            yield _event({"token": pending, "generated_text": _full_text(body, text), "details": details})
            pending = None


# -- tokenize -----------------------------------------------------------------


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, services: Services = Depends(get_services)) -> list[dict[str, Any]]:
    """The base model's tokens of ``inputs`` with their character offsets, as LoRAX answers."""
    tokenizer = services.catalog.base_tokenizer()

    def encode() -> list[dict[str, Any]]:
        encoded = tokenizer(body.inputs, add_special_tokens=body.add_special_tokens, return_offsets_mapping=True)
        ids = list(encoded["input_ids"])
        pieces = tokenizer.convert_ids_to_tokens(ids)
        offsets = encoded["offset_mapping"]
        return [
            {"id": tid, "text": piece, "start": start, "stop": stop}
            for tid, piece, (start, stop) in zip(ids, pieces, offsets, strict=True)
        ]

    return await anyio.to_thread.run_sync(encode)
