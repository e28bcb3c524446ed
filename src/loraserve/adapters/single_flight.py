"""Run one piece of work per key however many callers ask at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

T = TypeVar("T")


class SingleFlight(Generic[T]):
    """Concurrent callers with one key share one task, its result or its error.

    The task is shielded: a caller that goes away (client disconnect) does not
    cancel the work the others wait for.
    """

    def __init__(self) -> None:
        self._flights: dict[Hashable, asyncio.Task[T]] = {}

    async def run(self, key: Hashable, work: Callable[[], Awaitable[T]]) -> T:
        task = self._flights.get(key)
        if task is None:
            task = asyncio.ensure_future(work())
            self._flights[key] = task
            task.add_done_callback(lambda _: self._flights.pop(key, None))
            # Retrieve the exception even if every caller left, so asyncio does not log it as lost.
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return await asyncio.shield(task)
