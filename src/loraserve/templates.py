"""Chat prompts from the model's own template, rendered in killable sandbox processes.

The rendering itself lives in :mod:`loraserve.template_sandbox`; this module
picks the template (the adapter's, else the base's), runs it in a small pool of
worker processes with a time limit, and turns every failure into a 400. A
worker that runs past the limit is killed and the pool replaced; the server
stays healthy.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraserve import template_sandbox
from loraserve.errors import ChatTemplateMissing, InvalidRequest

logger = logging.getLogger(__name__)

RENDER_SECONDS = 2.0
_WORKERS = 2


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    # trust_remote_code stays off: a tokenizer folder never runs code here.
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


@dataclass(frozen=True)
class ChatFormat:
    """How one model turns text into tokens: its tokenizer and, optionally, a
    template that overrides the tokenizer's own (an adapter's chat_template.jinja)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None


class _Sandbox:
    """The worker pool; replaced whole when a worker must be killed."""

    def __init__(self) -> None:
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    _WORKERS,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=template_sandbox.init_worker,
                )
            return self._pool

    def replace(self, broken: ProcessPoolExecutor) -> None:
        with self._lock:
            if self._pool is broken:
                self._pool = None
        # The only way to stop a render that runs away: kill its process.
        for process in list(getattr(broken, "_processes", {}).values()):
            process.kill()
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


_sandbox = _Sandbox()


def start_sandbox() -> None:
    """Start the workers now, so the first chat request does not pay for it."""
    _sandbox.pool().submit(int).result(timeout=60)


def stop_sandbox() -> None:
    _sandbox.close()


def _template_source(chat: ChatFormat, tools: list[dict[str, Any]] | None) -> str | None:
    source = chat.chat_template or getattr(chat.tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates, as transformers allows
        source = source.get("tool_use") if tools and "tool_use" in source else source.get("default")
    return source if isinstance(source, str) and source else None


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return _template_source(ChatFormat(tokenizer), None) is not None


async def render_chat(
    chat: ChatFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """Render messages to the prompt text, ending with the assistant's turn."""
    source = _template_source(chat, tools)
    if source is None:
        raise ChatTemplateMissing(
            "This model has no chat template (neither the adapter nor the base model ships one), so "
            "/v1/chat/completions cannot format the messages; use /v1/completions with a plain prompt instead.",
            param="messages",
        )
    special_tokens = {k: v for k, v in chat.tokenizer.special_tokens_map.items() if isinstance(v, str)}
    context = {"messages": messages, "tools": tools, "add_generation_prompt": True, **special_tokens}
    kind, text = await _run(source, context)
    if kind == "ok":
        return text
    if kind == "template":
        raise InvalidRequest(f"The chat template rejected the messages: {text}", param="messages")
    if kind == "forbidden":
        raise InvalidRequest(f"The chat template tried an operation the sandbox forbids ({text}).", param="messages")
    raise InvalidRequest(f"The chat template failed: {text}", param="messages")


async def _run(source: str, context: dict[str, Any]) -> template_sandbox.Outcome:
    # One render per worker at a time: a burst queues here, so the time limit counts a render's own
    # time, never its wait (which turned bursts into 400s and killed healthy workers).
    async with _slots():
        for attempt in range(2):
            pool = _sandbox.pool()
            submitted = pool.submit(template_sandbox.render, source, context)
            try:
                return await asyncio.wait_for(asyncio.wrap_future(submitted), RENDER_SECONDS)
            except TimeoutError as exc:
                _sandbox.replace(pool)
                raise InvalidRequest(
                    f"The chat template took longer than {RENDER_SECONDS:g} s to render.", param="messages"
                ) from exc
            except (BrokenProcessPool, asyncio.CancelledError) as exc:
                task = asyncio.current_task()
                if isinstance(exc, asyncio.CancelledError) and (task is None or task.cancelling()):
                    raise  # this request was cancelled (its client left), not its render
                # Another request's runaway template took this pool down (its queued work is cancelled
                # with it), or this one crashed its worker: once more on a fresh pool.
                _sandbox.replace(pool)
                if attempt == 1:
                    raise InvalidRequest("The chat template crashed its sandbox.", param="messages") from exc
    raise AssertionError("unreachable")


_slot_semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}


def _slots() -> asyncio.Semaphore:
    """The render slots of the running loop (tests run several loops; the server one)."""
    loop = asyncio.get_running_loop()
    if loop not in _slot_semaphores:
        _slot_semaphores.clear()  # loops come and go in tests; only the current one matters
        _slot_semaphores[loop] = asyncio.Semaphore(_WORKERS)
    return _slot_semaphores[loop]
