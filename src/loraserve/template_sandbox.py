"""Chat-template rendering inside worker processes: Jinja2 only, capped memory, killable.

Adapter templates come from whoever published the adapter. Jinja's sandbox keeps
a template away from Python internals but not from loops that run for hours or
strings that fill the machine, so templates render here, in processes the
server can kill (after a time limit) and whose address space is capped. This
module imports nothing heavy: workers start in a fraction of a second.
"""

from __future__ import annotations

import json
import resource
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import Template, nodes
from jinja2.exceptions import SecurityError, TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

MEMORY_LIMIT_BYTES = 1 << 30
MAX_RENDERED_CHARS = 4_000_000
_MAX_VALUE_LENGTH = 1_000_000  # longest string or list one `*` may build
_MAX_EXPONENT = 256

Outcome = tuple[str, str]  # ("ok", text) | ("template", reason) | ("forbidden", reason) | ("failed", reason)


def init_worker() -> None:
    # A template that builds huge values gets a MemoryError here, not the machine's memory.
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT_BYTES, MEMORY_LIMIT_BYTES))


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


class _Generation(Extension):
    """transformers' `{% generation %}` tag (it marks assistant tokens for training); rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # As transformers does: Jinja's own tojson escapes HTML, which prompts must not contain.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=64)
def _compile(source: str) -> Template:
    environment = _GuardedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Generation])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return environment.from_string(source)


def render(source: str, context: dict[str, Any]) -> Outcome:
    """Render in this process; failures come back as values (Jinja's exceptions do not all pickle)."""
    try:
        pieces: list[str] = []
        size = 0
        for piece in _compile(source).generate(**context):
            size += len(piece)
            if size > MAX_RENDERED_CHARS:
                return ("forbidden", "the rendered prompt is too large")
            pieces.append(piece)
        return ("ok", "".join(pieces))
    except (SecurityError, MemoryError, RecursionError, OverflowError) as exc:
        return ("forbidden", type(exc).__name__)
    except TemplateError as exc:  # raise_exception() in templates ("roles must alternate") lands here
        return ("template", str(exc))
    except Exception as exc:  # a template bug (a missing key, a type error) is the template's fault
        return ("failed", f"{type(exc).__name__}: {exc}")
