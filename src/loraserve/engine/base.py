"""The ``Engine`` protocol and the plain data that crosses it.

The HTTP layer is tested against fakes of this protocol; the real
implementation is :mod:`loraserve.engine.vllm_engine`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class StructuredOutput:
    """A decoding constraint: a JSON schema, any JSON object, or a choice of strings."""

    kind: Literal["json", "json_object", "choice"]
    spec: Any = None


@dataclass(frozen=True)
class SamplingOptions:
    """What loraserve asks of the sampler; already validated and defaulted."""

    max_tokens: int
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # alternatives per sampled token; 0 = the sampled token's own only
    prompt_logprobs: int | None = None
    structured: StructuredOutput | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, and the most likely alternatives at that position."""

    token_id: int
    token: str
    logprob: float
    top: tuple[tuple[int, str, float], ...] = ()


@dataclass(frozen=True)
class LoraTarget:
    """An adapter the engine should apply: a stable positive id and its folder."""

    name: str
    int_id: int
    path: str
    # The engine's answer to add_lora, when requests are sent before it came (``Engine.send_lora``): ``generate``
    # awaits it before its first delta and raises its error, if any. None: the adapter was loaded before.
    loaded: asyncio.Future[None] | None = field(default=None, compare=False, repr=False)


@dataclass
class CompletionDelta:
    """New output since the previous delta of one choice (``index``) of a request."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    index: int = 0
    logprobs: list[TokenLogprob] | None = None
    # Only on a choice's first delta, when asked: None for the first prompt token, as OpenAI does.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None
    stop_reason: int | str | None = None  # with finish_reason "stop": the stop string or token id; None for EOS


class EngineRejected(Exception):
    """The engine refused the request as invalid (maps to 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class EngineBusy(Exception):
    """The engine's admission control turned the request away for now (maps to 503 + Retry-After)."""


class EngineDead(Exception):
    """The engine cannot serve any request (maps to 503)."""


class Engine(Protocol):
    @property
    def max_model_len(self) -> int: ...

    @property
    def max_lora_rank(self) -> int: ...

    @property
    def dtype(self) -> str:
        """The weights' type as the engine runs them ("bfloat16", …)."""
        ...

    @property
    def device_type(self) -> str:
        """ "cpu", "cuda", …"""
        ...

    async def add_lora(self, lora: LoraTarget) -> None:
        """Load an adapter before its first request; raise ``EngineRejected`` with the reason if it can't."""
        ...

    async def send_lora(self, lora: LoraTarget) -> asyncio.Future[None]:
        """Start ``add_lora`` and return its answer to come, once requests naming ``lora`` may follow it.

        An engine that cannot take requests before the answer returns it resolved (or raises its error).
        Requests sent meanwhile carry the answer as ``LoraTarget.loaded``.
        """
        ...

    async def remove_lora(self, int_id: int) -> None: ...

    def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        options: SamplingOptions,
        lora: LoraTarget | None = None,
    ) -> AsyncGenerator[CompletionDelta, None]:
        """Stream deltas; the last one has ``finish_reason`` set.

        Closing the iterator early must abort the request in the engine.
        """
        ...

    async def check_health(self) -> None:
        """Return when the engine answers a round trip; raise ``EngineDead`` otherwise."""
        ...

    def num_running_requests(self) -> int: ...

    async def shutdown(self) -> None: ...
