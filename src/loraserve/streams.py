"""Engine streams: several merged into one, and one whose first delta has already arrived."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from contextlib import aclosing

from loraserve.engine import CompletionDelta


async def merge_streams(
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
