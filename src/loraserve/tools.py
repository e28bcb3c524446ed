"""Tool calling: what the chat template sees, how decoding is constrained, and how
the model's output becomes OpenAI ``tool_calls``.

- ``auto``: the template renders the tools; output in Hermes style
  (``<tool_call>{"name": …, "arguments": …}</tool_call>``) or a bare JSON object
  naming a tool becomes tool calls, anything else is content.
- ``required`` / a named function: decoding is constrained to a JSON object
  ``{"name": …, "arguments": …}`` whose arguments follow the function's schema.
- ``none`` (or no tools): tools are not rendered; output is content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from loraserve.engine import CompletionDelta, StructuredOutput, TokenLogprob
from loraserve.events import TextDelta, ToolCallsDelta
from loraserve.protocol.requests import ChatCompletionRequest, NamedToolChoice
from loraserve.structured import check_schema

_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass(frozen=True)
class ParsedToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it


@dataclass(frozen=True)
class ToolPlan:
    mode: Literal["auto", "required", "named"]
    names: frozenset[str]
    template_tools: list[dict[str, Any]]
    constraint: StructuredOutput | None

    def parse(self, text: str) -> list[ParsedToolCall] | None:
        """Tool calls in the model's output, or None when it answered with content."""
        if self.mode != "auto":
            return _calls_from_json(text, self.names)
        stripped = text.strip()
        # Only output that starts as a call is one: streaming decides from the first characters, and
        # the plain answer must agree with the streamed one.
        blocks = _HERMES.findall(stripped) if stripped.startswith("<tool_call>") else []
        if blocks:
            calls = [call for block in blocks for call in (_calls_from_json(block, self.names) or [])]
            return calls or None
        return _calls_from_json(stripped, self.names) if stripped.startswith("{") else None

    def may_be_call(self, text: str) -> bool:
        """Could the output so far still turn into a tool call? (Streaming holds it back meanwhile.)"""
        if self.mode != "auto":
            return True
        head = text.lstrip()
        return (
            head == "" or head.startswith("{") or "<tool_call>".startswith(head[:11]) or head.startswith("<tool_call>")
        )


def plan_tools(body: ChatCompletionRequest) -> ToolPlan | None:
    if not body.tools or body.tool_choice == "none":
        return None
    functions = {tool.function.name: tool.function for tool in body.tools}
    template_tools = [tool.model_dump(exclude_none=True, by_alias=True) for tool in body.tools]

    def call_schema(name: str) -> dict[str, Any]:
        parameters = functions[name].parameters
        arguments = check_schema(parameters, "tools") if parameters else _ANY_OBJECT
        return {
            "type": "object",
            "properties": {"name": {"const": name}, "arguments": arguments},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }

    for name in functions:
        call_schema(name)  # every schema is checked, whatever the choice
    if isinstance(body.tool_choice, NamedToolChoice):
        name = body.tool_choice.function.name
        return ToolPlan("named", frozenset({name}), template_tools, StructuredOutput("json", call_schema(name)))
    if body.tool_choice == "required":
        schema = {"anyOf": [call_schema(name) for name in functions]}
        return ToolPlan("required", frozenset(functions), template_tools, StructuredOutput("json", schema))
    return ToolPlan("auto", frozenset(functions), template_tools, None)


def _calls_from_json(text: str, names: frozenset[str]) -> list[ParsedToolCall] | None:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than the parser goes
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        text_arguments = arguments if isinstance(arguments, str) else json.dumps(arguments)
        calls.append(ParsedToolCall(f"call_{uuid.uuid4().hex[:24]}", str(item["name"]), text_arguments))
    return calls or None


@dataclass
class _HeldChoice:
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    holding: bool = True


class ToolHoldBack:
    """Streaming with tools: a choice's text is held back while it may still turn into a tool call, then
    released as content, or turned into tool calls when the choice ends."""

    def __init__(self, plan: ToolPlan) -> None:
        self._plan = plan
        self._choices: dict[int, _HeldChoice] = {}

    def feed(self, delta: CompletionDelta) -> Iterator[TextDelta | ToolCallsDelta]:
        held = self._choices.setdefault(delta.index, _HeldChoice())
        if not held.holding:
            yield TextDelta.of(delta)
            return
        held.text += delta.text
        held.logprobs.extend(delta.logprobs or ())
        if delta.finish_reason is None:
            if not self._plan.may_be_call(held.text):
                held.holding = False
                yield TextDelta(delta.index, held.text, logprobs=held.logprobs)
            return
        calls = self._plan.parse(held.text)
        if calls:
            yield ToolCallsDelta(delta.index, calls, held.logprobs)
        else:
            yield TextDelta(delta.index, held.text, logprobs=held.logprobs, finish_reason=delta.finish_reason)
