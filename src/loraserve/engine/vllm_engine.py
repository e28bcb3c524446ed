"""The vLLM implementation of :class:`Engine` — the only module that imports vLLM.

``AsyncLLM`` runs in this process; its EngineCore runs in processes of its
own. We hand it token ids (loraserve tokenizes, so it can count and check the
context before the engine sees a request) and read deltas back.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
from collections.abc import AsyncGenerator
from typing import Any

import anyio
from vllm import SamplingParams
from vllm import __version__ as vllm_version
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import GracefulHTTPError, VLLMClientError, VLLMValidationError
from vllm.inputs.engine import tokens_input
from vllm.logprobs import Logprob
from vllm.lora.request import LoRARequest
from vllm.outputs import RequestOutput
from vllm.platforms import current_platform
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError

from loraserve.engine.base import (
    CompletionDelta,
    EngineBusy,
    EngineDead,
    EngineRejected,
    FinishReason,
    LoraTarget,
    SamplingOptions,
    TokenLogprob,
)
from loraserve.engine.cpu_priority import CpuPriority, set_engine_priority
from loraserve.engine.lora_guard import GUARD_UTILITY, GUARD_VERSION
from loraserve.logs import progress

logger = logging.getLogger(__name__)

# How long vLLM's engine processes get to exit at shutdown before they are killed (vLLM waits 5 s
# for its workers, then 5 s for the EngineCore); the worker waits on its queues rather than exiting.
_SHUTDOWN_TIMEOUT_S = 2.0
_WORKER_SHUTDOWN_TIMEOUT_ENV = "VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS"

# vLLM on a CPU keeps one core per engine process for its scheduler; on a small machine that is half of it.
# Measured here (2 cores, benchmarks/compare.py, the mixed workload): every core computing gave 111 output
# tok/s and TTFT p50 0.70 s against 79 tok/s and 1.14 s; the API process and the scheduler are light.
_CPU_RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"


def apply_cpu_defaults(environ: dict[str, str] | os._Environ[str] = os.environ, priority: CpuPriority = "idle") -> None:
    """On a CPU, the engine computes on every core unless the user reserves some (their variable wins), and at
    ``priority`` beside this process (``cpu_priority``)."""
    if current_platform.is_cpu():
        environ.setdefault(_CPU_RESERVED_ENV, "0")
        set_engine_priority(priority, environ)


# Flags loraserve owns itself, even though vLLM's parser also defines them.
_OWNED_BY_LORASERVE = {"model", "served_model_name"}


def engine_flag_defaults() -> dict[str, Any]:
    """loraserve's defaults for vLLM flags: LoRA on, sizes that share a batch, and on
    CPU a KV-cache RAM fraction that fits (vLLM's 0.92 fails to start there)."""
    defaults: dict[str, Any] = {
        "enable_lora": True,
        "max_loras": 4,
        "max_lora_rank": 16,
        "max_cpu_loras": 8,
        # Compact JSON for response_format and forced tool calls: with free whitespace inside the
        # grammar, small models pad with newlines until max_tokens (measured with SmolLM2 here).
        "structured_outputs_config": StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        # A progress bar for loading a checkpoint shows nothing useful in a log (it redraws one line).
        "use_tqdm_on_load": False,
    }
    if current_platform.is_cpu():
        defaults["gpu_memory_utilization"] = 0.3
    return defaults


def add_engine_cli_args(parser: argparse.ArgumentParser) -> set[str]:
    """Add every vLLM engine flag under vLLM's own name; return their dests."""
    before = {action.dest for action in parser._actions}
    AsyncEngineArgs.add_cli_args(parser)
    added = {action.dest for action in parser._actions} - before - _OWNED_BY_LORASERVE
    parser.set_defaults(**engine_flag_defaults())
    return added


# Any JSON object, with no whitespace outside strings. vLLM's own json_object asks xgrammar 0.2.8 for
# `{"type": "object"}` with compact separators, and that version still allows a space after each comma
# (xgrammar #945), while json_schema output comes out compact; this EBNF makes both kinds agree.
COMPACT_JSON_OBJECT_GRAMMAR = r"""
root ::= object
value ::= object | array | string | number | "true" | "false" | "null"
object ::= "{" (member ("," member)*)? "}"
member ::= string ":" value
array ::= "[" (value ("," value)*)? "]"
string ::= "\"" char* "\""
char ::= [^"\\\x00-\x1f] | "\\" escape
escape ::= ["\\/bfnrt] | "u" hex hex hex hex
hex ::= [0-9a-fA-F]
number ::= "-"? integer fraction? exponent?
integer ::= "0" | [1-9] [0-9]*
fraction ::= "." [0-9]+
exponent ::= [eE] [+-]? [0-9]+
"""


def _sampling_params(options: SamplingOptions) -> SamplingParams:
    structured = None
    if options.structured is not None:
        kind, spec = options.structured.kind, options.structured.spec
        if kind == "json":
            structured = StructuredOutputsParams(json=spec)
        elif kind == "json_object":
            structured = StructuredOutputsParams(grammar=COMPACT_JSON_OBJECT_GRAMMAR)
        else:
            structured = StructuredOutputsParams(choice=list(spec))
    return SamplingParams(
        n=options.n,
        max_tokens=options.max_tokens,
        temperature=options.temperature,
        top_p=options.top_p,
        top_k=options.top_k,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        stop=list(options.stop) or None,
        seed=options.seed,
        logit_bias=dict(options.logit_bias) or None,
        min_tokens=options.min_tokens,
        ignore_eos=options.ignore_eos,
        skip_special_tokens=options.skip_special_tokens,
        logprobs=options.logprobs,
        prompt_logprobs=options.prompt_logprobs,
        structured_outputs=structured,
        output_kind=RequestOutputKind.DELTA,
    )


def _token_logprob(token_id: int, candidates: dict[int, Logprob], top: int) -> TokenLogprob:
    own = candidates.get(token_id)
    # vLLM returns the top-k by rank plus the sampled token, whatever its rank.
    ranked = sorted(
        ((tid, lp) for tid, lp in candidates.items() if lp.rank is not None), key=lambda item: item[1].rank or 0
    )[:top]
    return TokenLogprob(
        token_id=token_id,
        token=(own.decoded_token if own and own.decoded_token is not None else ""),
        logprob=float(own.logprob) if own else float("-inf"),
        top=tuple((tid, lp.decoded_token or "", float(lp.logprob)) for tid, lp in ranked),
    )


def _logprobs(token_ids: list[int], per_token: Any, top: int) -> list[TokenLogprob]:
    if not per_token:
        return []
    return [_token_logprob(tid, candidates, top) for tid, candidates in zip(token_ids, per_token, strict=False)]


def _prompt_logprobs(prompt_ids: list[int], per_token: Any, top: int) -> list[TokenLogprob | None]:
    pairs = zip(prompt_ids, per_token, strict=False)
    return [None if candidates is None else _token_logprob(tid, candidates, top) for tid, candidates in pairs]


def _lora_request(lora: LoraTarget) -> LoRARequest:
    return LoRARequest(lora_name=lora.name, lora_int_id=lora.int_id, lora_path=lora.path)


def _resolved() -> asyncio.Future[None]:
    answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    answer.set_result(None)
    return answer


def _loaded(lora: LoraTarget) -> bool:
    """Whether the engine has said yes to the adapter's add_lora (or it was loaded before requests used it)."""
    answer = lora.loaded
    return answer is None or (answer.done() and not answer.cancelled() and answer.exception() is None)


async def _once_loaded(
    pending: asyncio.Future[None], stream: AsyncGenerator[RequestOutput, None]
) -> AsyncGenerator[RequestOutput, None]:
    """``stream``'s outputs, sent to the engine at once, right behind the adapter's add_lora; the first is passed
    on only once ``pending`` (add_lora's answer) says yes. On a refusal the request is cancelled (EngineCore
    never scheduled it: lora_guard) and the refusal raised, before anything reached the client."""
    first = None if pending.done() else asyncio.ensure_future(anext(stream))  # sends the request now
    try:
        await asyncio.shield(pending)  # shared by every request of the adapter: one's cancellation is not theirs
    except BaseException as exc:
        if first is not None:
            first.cancel()
            await asyncio.wait([first])
            if not first.cancelled():
                first.exception()  # retrieved: the refusal is the error to report
        if pending.cancelled():  # the load itself was cancelled (a stopping server), not this request
            raise EngineDead("the adapter's load into the engine was cancelled") from exc
        raise
    if first is not None:
        try:
            output = await first
        except StopAsyncIteration:
            return
        yield output
    async for output in stream:
        yield output


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[-1][:500] if text else type(exc).__name__


def _finish_reason(raw: str | None) -> FinishReason | None:
    if raw is None:
        return None
    if raw in ("stop", "length"):
        return raw  # type: ignore[return-value]
    raise RuntimeError(f"the engine ended the request with '{raw}'")


class VllmEngine:
    """``Engine`` backed by vLLM's ``AsyncLLM``."""

    def __init__(self, llm: AsyncLLM) -> None:
        self._llm = llm
        self._lora_guarded: bool | None = None  # whether EngineCore runs lora_guard; asked on the first load

    @classmethod
    def start(
        cls, model_path: str, served_name: str, engine_args: dict[str, Any], cpu_priority: CpuPriority = "idle"
    ) -> VllmEngine:
        kwargs = {**engine_flag_defaults(), **engine_args}
        kwargs.update(model=model_path, served_model_name=[served_name], enable_lora=True)
        fields = set(AsyncEngineArgs.__dataclass_fields__)
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise ValueError(f"unknown vLLM engine arguments: {', '.join(unknown)}")
        # Read by the EngineCore process it starts: one second for its workers to exit at shutdown.
        os.environ.setdefault(_WORKER_SHUTDOWN_TIMEOUT_ENV, "1")
        apply_cpu_defaults(priority=cpu_priority)
        with progress(logger, "Starting the vLLM engine (about a minute on a CPU)"):
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        lora = llm.vllm_config.lora_config
        logger.info(
            "Engine: vLLM %s on %s, dtype %s, context %d tokens, %s LoRA slots, max LoRA rank %s",
            vllm_version,
            current_platform.device_type,
            str(llm.model_config.dtype).removeprefix("torch."),
            llm.model_config.max_model_len,
            lora.max_loras if lora else 0,
            lora.max_lora_rank if lora else 0,
        )
        return cls(llm)

    @property
    def max_model_len(self) -> int:
        return int(self._llm.model_config.max_model_len)

    @property
    def dtype(self) -> str:
        return str(self._llm.model_config.dtype).removeprefix("torch.")

    @property
    def device_type(self) -> str:
        return str(current_platform.device_type)

    @property
    def max_lora_rank(self) -> int:
        lora_config = self._llm.vllm_config.lora_config
        return int(lora_config.max_lora_rank) if lora_config is not None else 0

    async def add_lora(self, lora: LoraTarget) -> None:
        try:
            ok = await self._llm.add_lora(_lora_request(lora))
        except EngineDeadError as exc:
            raise EngineDead("the inference engine has stopped") from exc
        except Exception as exc:  # vLLM reports load failures as assorted exceptions
            raise EngineRejected(_first_line(exc)) from exc
        if ok is False:
            raise EngineRejected("the engine refused the adapter")

    async def send_lora(self, lora: LoraTarget) -> asyncio.Future[None]:
        if not await self._guarded():
            await self.add_lora(lora)
            return _resolved()
        answer = asyncio.ensure_future(self.add_lora(lora))
        # Its first step runs now, and nothing in it suspends before add_lora is on EngineCore's input socket
        # (AsyncMPClient._call_utility_async sends, then awaits): any request sent after this queues behind it.
        await asyncio.sleep(0)
        return answer

    async def _guarded(self) -> bool:
        """Whether EngineCore leaves out requests whose LoRA it refused (engine/lora_guard.py)."""
        if self._lora_guarded is None:
            try:
                version = await self._llm.engine_core.call_utility_async(GUARD_UTILITY)
            except Exception:  # no such utility (the plugin did not load), an in-process engine, …
                logger.debug("no %s in the engine", GUARD_UTILITY, exc_info=True)
                version = None
            self._lora_guarded = version == GUARD_VERSION
            if not self._lora_guarded:
                logger.info("The engine has no LoRA guard: first requests for an adapter wait for it to load")
        return self._lora_guarded

    async def remove_lora(self, int_id: int) -> None:
        await self._llm.remove_lora(int_id)

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        lora: LoraTarget | None = None,
    ) -> AsyncGenerator[CompletionDelta, None]:
        lora_request = _lora_request(lora) if lora else None
        try:
            params = _sampling_params(options)
        except (VLLMValidationError, VLLMClientError, ValueError) as exc:
            raise EngineRejected(str(exc), getattr(exc, "parameter", None)) from exc
        stream = self._llm.generate(tokens_input(prompt_token_ids), params, request_id, lora_request=lora_request)
        pending = lora.loaded if lora is not None and not _loaded(lora) else None
        outputs = stream if pending is None else _once_loaded(pending, stream)
        finished = False
        # vLLM sends each of the n samples on its own; every choice's first delta gets the prompt's logprobs.
        prompt_logprobs: list[TokenLogprob | None] | None = None
        owed_prompt_logprobs = set(range(options.n)) if options.prompt_logprobs is not None else set()
        try:
            async for output in outputs:
                finished = output.finished
                if owed_prompt_logprobs and prompt_logprobs is None and output.prompt_logprobs:
                    prompt_logprobs = _prompt_logprobs(
                        prompt_token_ids, output.prompt_logprobs, options.prompt_logprobs or 0
                    )
                for completion in output.outputs:
                    first_of_choice = prompt_logprobs is not None and completion.index in owed_prompt_logprobs
                    if first_of_choice:
                        owed_prompt_logprobs.discard(completion.index)
                    token_ids = list(completion.token_ids)
                    yield CompletionDelta(
                        completion.text,
                        token_ids,
                        _finish_reason(completion.finish_reason),
                        index=completion.index,
                        logprobs=(
                            _logprobs(token_ids, completion.logprobs, options.logprobs)
                            if options.logprobs is not None
                            else None
                        ),
                        prompt_logprobs=prompt_logprobs if first_of_choice else None,
                        cumulative_logprob=completion.cumulative_logprob,
                        stop_reason=completion.stop_reason,
                    )
        except EngineDeadError as exc:
            raise EngineDead("the inference engine has stopped") from exc
        except (VLLMValidationError, VLLMClientError) as exc:
            raise EngineRejected(str(exc), getattr(exc, "parameter", None)) from exc
        except GracefulHTTPError as exc:  # admission control: --max-num-queued-reqs / -tokens
            raise EngineBusy(str(exc)) from exc
        finally:
            # AsyncLLM aborts on cancellation; an early aclose() must abort too. Shielded: under a
            # cancelled anyio scope (a streaming response whose client left) every await is cancelled
            # again, and an abort that never reaches the engine leaves the request running there while
            # its adapter's lease is released, so the adapter's files can be evicted under it.
            if not finished:
                with anyio.CancelScope(shield=True):
                    if outputs is not stream:
                        await outputs.aclose()
                    await stream.aclose()
                    await self._llm.abort(request_id)

    async def check_health(self) -> None:
        if self._llm.errored:
            raise EngineDead("the inference engine has stopped")
        try:
            # A real round trip to the EngineCore process, not just a flag.
            await self._llm.is_sleeping()
        except (EngineDeadError, ConnectionError) as exc:
            raise EngineDead("the inference engine does not answer") from exc

    def num_running_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests())

    async def shutdown(self) -> None:
        # vLLM cancels its output handler only after the engine processes are gone, so until then the
        # handler sees the engine die and logs EngineDeadError at ERROR. A planned stop is no error:
        # stop reading first. Nothing is lost by the short timeout: requests have drained by now.
        handler = getattr(self._llm, "output_handler", None)
        if handler is not None:
            handler.cancel()
            await asyncio.sleep(0)
        await asyncio.to_thread(self._llm.shutdown, _SHUTDOWN_TIMEOUT_S)


def engine_parser_class() -> type[argparse.ArgumentParser]:
    """vLLM's flag definitions need its own parser class (JSON and dotted flags)."""
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser_class: type[argparse.ArgumentParser] = FlexibleArgumentParser
    return parser_class
