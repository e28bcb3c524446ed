"""Chat prompt rendering with the model's own template, in a guarded sandbox.

Adapter templates come from whoever published the adapter, so rendering must
survive hostile ones. Like transformers, we render in Jinja's
``ImmutableSandboxedEnvironment`` (no Python internals, no mutation); on top of
that, multiplication and power cannot build huge values, rendering stops after
a time limit, and the output has a size limit. Each failure is a 400, and the
server stays healthy.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from types import FrameType
from typing import Any

from jinja2 import Template
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraserve.errors import ChatTemplateMissing, InvalidRequest

RENDER_SECONDS = 2.0
MAX_RENDERED_CHARS = 4_000_000
_MAX_VALUE_LENGTH = 1_000_000  # longest string or list one `*` may build
_MAX_EXPONENT = 256


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    # trust_remote_code stays off: a tokenizer folder never runs code here.
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


@dataclass(frozen=True)
class ChatFormat:
    """How one model turns text into tokens: its tokenizer and, optionally, a
    template that overrides the tokenizer's own (an adapter's chat_template.jinja)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None


class _TemplateTimeout(Exception):
    pass


class _GuardedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus limits on the operators that build big values in one step."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError("exponent too large")
        if operator == "*":
            for sized, count in ((left, right), (right, left)):
                if isinstance(sized, str | list | tuple) and isinstance(count, int):
                    if len(sized) * count > _MAX_VALUE_LENGTH:
                        raise SecurityError("repetition too large")
        return super().call_binop(context, operator, left, right)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # As transformers does: Jinja's own tojson escapes HTML, which prompts must not contain.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str) -> Template:
    environment = _GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def _template_source(chat: ChatFormat, tools: list[dict[str, Any]] | None) -> str | None:
    source = chat.chat_template or getattr(chat.tokenizer, "chat_template", None)
    if isinstance(source, dict):  # several named templates, as transformers allows
        source = source.get("tool_use") if tools and "tool_use" in source else source.get("default")
    return source if isinstance(source, str) and source else None


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return _template_source(ChatFormat(tokenizer), None) is not None


def render_chat(chat: ChatFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """Render messages to the prompt text, ending with the assistant's turn."""
    source = _template_source(chat, tools)
    if source is None:
        raise ChatTemplateMissing(
            "This model has no chat template (neither the adapter nor the base model ships one), so "
            "/v1/chat/completions cannot format the messages; use /v1/completions with a plain prompt instead.",
            param="messages",
        )
    special_tokens = {k: v for k, v in chat.tokenizer.special_tokens_map.items() if isinstance(v, str)}
    try:
        template = _compile(source)
        with _deadline(RENDER_SECONDS):
            rendered = template.render(messages=messages, tools=tools, add_generation_prompt=True, **special_tokens)
    except _TemplateTimeout as exc:
        raise InvalidRequest(
            f"The chat template took longer than {RENDER_SECONDS:.0f} s to render.", param="messages"
        ) from exc
    except (SecurityError, MemoryError, RecursionError, OverflowError) as exc:
        raise InvalidRequest("The chat template tried an operation the sandbox forbids.", param="messages") from exc
    except TemplateError as exc:
        # raise_exception() in templates (e.g. "roles must alternate") lands here.
        raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
    except Exception as exc:  # a template bug (a missing key, a type error) is the template's fault
        raise InvalidRequest(f"The chat template failed: {type(exc).__name__}: {exc}", param="messages") from exc
    if len(rendered) > MAX_RENDERED_CHARS:
        raise InvalidRequest("The chat template produced an oversized prompt.", param="messages")
    return rendered


class _deadline:
    """Stop Python code running in this thread once ``seconds`` have passed.

    Jinja compiles templates to Python, so a line tracer sees every loop step
    and can end a template that would otherwise loop for hours.
    """

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds
        self._previous: Any = None

    def _trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        if time.monotonic() > self._until:
            raise _TemplateTimeout
        return self._trace

    def __enter__(self) -> None:
        self._until = time.monotonic() + self._seconds
        self._previous = sys.gettrace()
        sys.settrace(self._trace)

    def __exit__(self, *exc: object) -> None:
        sys.settrace(self._previous)
