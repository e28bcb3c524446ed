"""One record per HTTP request: its id (``X-Request-Id``), one structured log line, and its metrics.

The outermost middleware opens the record, so every answer is counted and carries
the id, also refusals that no route sees (431, 401, 429, 503 while stopping). A
route fills in what only it knows (the model that answered, token counts) through
``request_record(request)``; the line is written when the response's last byte is
sent, so a stream's line has its real duration and token count.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.datastructures import MutableHeaders
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraserve.generation import TokenProgress

logger = logging.getLogger("loraserve.requests")

REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept only when it is a plain token: it goes into logs and headers as is.
_CLIENT_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# Probes and scrapes arrive every few seconds: their lines are debug-level.
_QUIET_PATHS = frozenset({"/health", "/metrics"})
_STATE_KEY = "loraserve_record"


@dataclass
class RequestRecord:
    request_id: str
    method: str
    path: str
    started: float = field(default_factory=time.monotonic)
    status: int = 0
    requested: str | None = None  # the request's `model` field, once its body parsed
    model: str | None = None  # the model that answered, once the request named one that resolved
    is_adapter: bool = False
    prompt_tokens: int = 0
    progress: TokenProgress = field(default_factory=TokenProgress)
    error_code: str | None = None
    duration: float = 0.0

    def answered_by(self, model: str, is_adapter: bool, prompt_tokens: int, progress: TokenProgress) -> None:
        self.model = model
        self.is_adapter = is_adapter
        self.prompt_tokens = prompt_tokens
        self.progress = progress

    @property
    def time_to_first_token(self) -> float | None:
        first = self.progress.first_token_at
        return None if first is None else first - self.started


def request_record(request: Request) -> RequestRecord:
    """The record of this request (a detached one when the middleware is not installed, as in some tests)."""
    scope = request.scope
    record = scope.get("state", {}).get(_STATE_KEY)
    if record is None:
        record = RequestRecord(_new_id(), scope.get("method", ""), scope.get("path", ""))
    return record  # type: ignore[no-any-return]


def _new_id() -> str:
    return uuid.uuid4().hex


def _client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            text = value.decode("latin-1")
            return text if _CLIENT_ID.fullmatch(text) else None
    return None


def _logfmt(value: object) -> str:
    text = str(value)
    if text and all(c.isalnum() or c in "._/:@-" for c in text):
        return text
    return json.dumps(text)  # quoted and escaped: a path or name cannot forge another line


def log_line(record: RequestRecord) -> str:
    ttft = record.time_to_first_token
    fields = {
        "id": record.request_id,
        "method": record.method,
        "path": record.path,
        "status": record.status,
        "model": record.model or "-",
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.progress.completion_tokens,
        "ttft_s": "-" if ttft is None else f"{ttft:.3f}",
        "duration_s": f"{record.duration:.3f}",
    }
    if record.error_code:
        fields["error"] = record.error_code
    return "request " + " ".join(f"{key}={_logfmt(value)}" for key, value in fields.items())


class RequestObserver:
    """Gives each request its record and id, echoes the id, and reports the record when the answer ends."""

    def __init__(self, app: ASGIApp, on_finish: Callable[[RequestRecord], None] | None = None) -> None:
        self.app = app
        self.on_finish = on_finish

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        record = RequestRecord(_client_request_id(scope) or _new_id(), scope["method"], scope["path"])
        scope.setdefault("state", {})[_STATE_KEY] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            if record.status == 0:
                record.status = 500
            raise
        finally:
            record.duration = time.monotonic() - record.started
            record.error_code = scope["state"].get("error_code")  # set by the error handlers
            self._finish(record)

    def _finish(self, record: RequestRecord) -> None:
        level = logging.DEBUG if record.path in _QUIET_PATHS else logging.INFO
        logger.log(level, "%s", log_line(record))
        if self.on_finish is not None:
            try:
                self.on_finish(record)
            except Exception:  # metrics must never break an answer
                logger.exception("recording metrics for request %s failed", record.request_id)
