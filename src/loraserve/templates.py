"""Chat prompt rendering with the tokenizer's own template, in a sandbox.

transformers renders chat templates in Jinja's ``ImmutableSandboxedEnvironment``,
so a template cannot reach Python internals.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.exceptions import SecurityError, TemplateError
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from loraserve.errors import ChatTemplateMissing, InvalidRequest


def load_tokenizer(path: Path) -> PreTrainedTokenizerBase:
    # trust_remote_code stays off: a tokenizer folder never runs code here.
    return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


@dataclass(frozen=True)
class ChatFormat:
    """How one model turns text into tokens: its tokenizer and, optionally, a
    template that overrides the tokenizer's own (an adapter's chat_template.jinja)."""

    tokenizer: PreTrainedTokenizerBase
    chat_template: str | None = None


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_chat(chat: ChatFormat, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """Render messages to the prompt text, ending with the assistant's turn."""
    tokenizer = chat.tokenizer
    if chat.chat_template is None and not has_chat_template(tokenizer):
        raise ChatTemplateMissing(
            "This model has no chat template (neither the adapter nor the base model ships one), so "
            "/v1/chat/completions cannot format the messages; use /v1/completions with a plain prompt instead.",
            param="messages",
        )
    try:
        rendered = tokenizer.apply_chat_template(
            messages, tools=tools, chat_template=chat.chat_template, tokenize=False, add_generation_prompt=True
        )
    except SecurityError as exc:
        raise InvalidRequest("The chat template tried an operation the sandbox forbids.", param="messages") from exc
    except TemplateError as exc:
        # raise_exception() in templates (e.g. "roles must alternate") lands here.
        raise InvalidRequest(f"The chat template rejected the messages: {exc}", param="messages") from exc
    assert isinstance(rendered, str)
    return rendered
