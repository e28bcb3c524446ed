"""Engine output → OpenAI's logprob shapes (chat's per-token objects, completions' parallel lists)."""

from __future__ import annotations

from collections.abc import Sequence

from loraserve.engine import TokenLogprob
from loraserve.protocol.responses import ChatLogprobs, ChatTokenLogprob, CompletionLogprobs, TopLogprob


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8"))


def chat_logprobs(entries: Sequence[TokenLogprob]) -> ChatLogprobs:
    return ChatLogprobs(
        content=[
            ChatTokenLogprob(
                token=entry.token,
                logprob=entry.logprob,
                bytes=_bytes(entry.token),
                top_logprobs=[TopLogprob(token=tok, logprob=lp, bytes=_bytes(tok)) for _, tok, lp in entry.top],
            )
            for entry in entries
        ]
    )


def completion_logprobs(
    entries: Sequence[TokenLogprob | None], tokens_text: Sequence[str] | None = None, start_offset: int = 0
) -> CompletionLogprobs:
    """``entries`` may start with None (the first prompt token has no logprob)."""
    tokens: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    offset = start_offset
    for i, entry in enumerate(entries):
        text = entry.token if entry is not None else (tokens_text[i] if tokens_text else "")
        tokens.append(text)
        values.append(entry.logprob if entry is not None else None)
        tops.append({tok: lp for _, tok, lp in entry.top} if entry is not None else None)
        offsets.append(offset)
        offset += len(text)
    return CompletionLogprobs(tokens=tokens, token_logprobs=values, top_logprobs=tops, text_offset=offsets)
