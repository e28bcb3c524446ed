"""Refuse requests whose headers are too many or too large (431, OpenAI-shaped), before any route runs.

uvicorn's httptools parser accepts headers of any size; a 100 KB header was
served (vLLM had a CVE for exactly this). The sum of names and values is capped,
and so is their count; real clients send a few hundred bytes.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from loraserve.errors import HeadersTooLarge, refuse

MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_COUNT = 100


class HeaderLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADER_COUNT) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            size = sum(len(name) + len(value) for name, value in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                error = HeadersTooLarge(
                    f"The request headers are too large: {len(headers)} headers, {size} bytes; "
                    f"the limits are {self.max_count} headers and {self.max_bytes} bytes."
                )
                await refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)
