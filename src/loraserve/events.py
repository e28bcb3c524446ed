"""What a streamed answer is made of, whatever the front door: typed events that each door serializes.

``stream_events`` turns the engine's deltas into these: text (held back while it
may still be a tool call), tool calls, the usage at the end, and an error in-band
when the stream fails after it started (the HTTP status is sent by then).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraserve.engine import CompletionDelta, FinishReason, TokenLogprob
from loraserve.errors import EngineFailure, LoraserveError

if TYPE_CHECKING:
    from loraserve.generation import PreparedRequest
    from loraserve.streams import PrimedStream
    from loraserve.tools import ParsedToolCall

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TextDelta:
    """New text of one choice; ``finish_reason`` set on the choice's last one."""

    index: int
    text: str
    token_ids: tuple[int, ...] = ()
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # only on a choice's first delta, when asked
    finish_reason: FinishReason | None = None
    stop_reason: int | str | None = None  # the stop string or token that ended it, if one did

    @classmethod
    def of(cls, delta: CompletionDelta) -> TextDelta:
        return cls(
            delta.index,
            delta.text,
            tuple(delta.token_ids),
            delta.logprobs,
            delta.prompt_logprobs,
            delta.finish_reason,
            delta.stop_reason,
        )


@dataclass(frozen=True)
class ToolCallsDelta:
    """A choice ended as tool calls (its finish reason is "tool_calls")."""

    index: int
    calls: list[ParsedToolCall]
    logprobs: list[TokenLogprob] | None = None


@dataclass(frozen=True)
class UsageReport:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class StreamFailed:
    error: LoraserveError


StreamEvent = TextDelta | ToolCallsDelta | UsageReport | StreamFailed


async def stream_events(prepared: PreparedRequest, deltas: PrimedStream) -> AsyncIterator[StreamEvent]:
    """The answer's events, ending with its usage, or with the error that cut it short."""
    from loraserve.tools import ToolHoldBack

    hold_back = ToolHoldBack(prepared.tools) if prepared.tools is not None else None
    tokens = 0
    try:
        async for delta in deltas:
            tokens += len(delta.token_ids)
            if hold_back is not None:
                for event in hold_back.feed(delta):
                    yield event
            else:
                yield TextDelta.of(delta)
        yield UsageReport(prepared.prompt_tokens, tokens)
    except LoraserveError as exc:
        yield StreamFailed(exc)
    except Exception:  # our own bug mid-stream: still end the stream the way clients expect
        logger.exception("stream %s failed", prepared.request_id)
        yield StreamFailed(EngineFailure("The server failed while streaming; the answer is incomplete."))
