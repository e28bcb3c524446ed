"""The engine boundary: everything else talks to :class:`Engine`; only ``vllm_engine`` imports vLLM."""

from loraserve.engine.base import (
    CompletionDelta,
    Engine,
    EngineBusy,
    EngineDead,
    EngineRejected,
    FinishReason,
    LoraTarget,
    SamplingOptions,
    StructuredOutput,
    TokenLogprob,
)

__all__ = [
    "CompletionDelta",
    "Engine",
    "EngineBusy",
    "EngineDead",
    "EngineRejected",
    "FinishReason",
    "LoraTarget",
    "SamplingOptions",
    "StructuredOutput",
    "TokenLogprob",
]
