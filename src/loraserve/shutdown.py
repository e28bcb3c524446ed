"""A graceful stop: refuse new requests at once, let running ones finish until a deadline, then end them.

On SIGTERM (or Ctrl-C) uvicorn stops listening and waits for open connections.
``Drain.begin()`` is called at that moment: from then on every new request is a
503 with Retry-After (``DrainMiddleware``), and requests already running keep
generating for up to ``--shutdown-timeout`` seconds. Past it, their engine
requests are ended: a stream gets an in-band error and ``[DONE]``, a plain
request a 503. The process exits as soon as the last one is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TypeVar

import anyio
from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.errors import ServerShuttingDown, refuse

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Drain:
    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.draining = False
        self._expired = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop the server runs on (signals arrive outside it)."""
        self._loop = loop

    def begin(self) -> None:
        """Start draining; safe to call from a signal handler and more than once."""
        if self._loop is None or self.draining:
            return
        self.draining = True  # a plain flag: new requests see it at once
        self._loop.call_soon_threadsafe(self._schedule_deadline)

    def _schedule_deadline(self) -> None:
        logger.info("Stopping: finishing running requests (at most %g s), refusing new ones", self.timeout_s)
        assert self._loop is not None
        self._loop.call_later(self.timeout_s, self._expire)

    def _expire(self) -> None:
        logger.warning("Stopping: --shutdown-timeout of %g s passed; ending the requests still running", self.timeout_s)
        self._expired.set()

    @property
    def expired(self) -> bool:
        return self._expired.is_set()

    async def until_expired(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """``source``'s items until the deadline passes, then ServerShuttingDown."""
        if self.expired:
            raise ServerShuttingDown("The server is shutting down; retry on another server.")
        expiry = asyncio.ensure_future(self._expired.wait())
        item: asyncio.Future[T] | None = None
        try:
            while True:
                item = asyncio.ensure_future(anext(source))
                await asyncio.wait({item, expiry}, return_when=asyncio.FIRST_COMPLETED)
                if not item.done():
                    raise ServerShuttingDown(
                        "The server is shutting down and ended this request before it finished; "
                        "retry on another server."
                    )
                try:
                    value = item.result()
                except StopAsyncIteration:
                    return
                yield value
        finally:
            expiry.cancel()
            # However this ends (the deadline, or the request cancelled because its client left), the
            # source must not be left running inside a task: its owner closes it next, which aborts the
            # engine request, and closing a generator that still runs elsewhere fails.
            if item is not None and not item.done():
                item.cancel()
                with anyio.CancelScope(shield=True):  # a cancelled anyio scope would cancel this wait too
                    await asyncio.gather(item, return_exceptions=True)


class DrainMiddleware:
    """While the server drains, every new request is a 503 (load balancers move on, clients retry)."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.draining:
            error = ServerShuttingDown("The server is shutting down; retry on another server.")
            await refuse(error, scope, receive, send)
            return
        await self.app(scope, receive, send)
