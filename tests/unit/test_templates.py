from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraserve.app import create_app
from loraserve.config import Settings
from loraserve.errors import ChatTemplateMissing, InvalidRequest
from loraserve.templates import RENDER_SECONDS, ChatFormat, load_tokenizer, render_chat
from tests.unit.conftest import CHATML, FakeEngine, make_tokenizer_dir

USER = [{"role": "user", "content": "hello"}]


def test_model_without_template_answers_chat_with_400_and_completions_work(tmp_path: Path) -> None:
    model = make_tokenizer_dir(tmp_path / "plain", chat_template=None)
    engine = FakeEngine()
    settings = Settings(model=str(model), cache_dir=tmp_path / "cache")
    with TestClient(create_app(settings, engine=engine)) as client:
        chat = client.post("/v1/chat/completions", json={"model": "", "messages": USER})
        assert chat.status_code == 400
        error = chat.json()["error"]
        assert error["code"] == "chat_template_missing"
        assert "/v1/completions" in error["message"]
        assert client.post("/v1/completions", json={"model": "", "prompt": "hello", "max_tokens": 1}).status_code == 200
    assert len(engine.calls) == 1


async def test_render_raises_template_missing(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "plain", chat_template=None))
    with pytest.raises(ChatTemplateMissing):
        await render_chat(ChatFormat(tokenizer), USER)


async def test_template_cannot_escape_the_sandbox(tmp_path: Path) -> None:
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "evil", chat_template=evil))
    with pytest.raises(InvalidRequest):
        await render_chat(ChatFormat(tokenizer), USER)


async def test_template_raise_exception_is_a_400_with_its_reason(tmp_path: Path) -> None:
    strict = "{% if messages[0]['role'] != 'system' %}{{ raise_exception('first message must be system') }}{% endif %}"
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "strict", chat_template=strict))
    with pytest.raises(InvalidRequest, match="first message must be system"):
        await render_chat(ChatFormat(tokenizer), USER)


@pytest.mark.parametrize(
    "hostile",
    [
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}"
        "{% endfor %}{% endfor %}",
        "{{ 'a' * 10000000000 }}",
        "{{ ['a'] * 10000000000 }}",
        "{{ 2 ** 100000000 }}",
        "{% for i in range(100000) %}{{ 'x' * 99999 }}{% endfor %}",
        # Jinja helpers catch Exception: a time limit raised as one would be swallowed.
        "{% for a in range(100000) %}{% for b in range(100000) %}{% if a is sequence %}{% endif %}"
        "{% endfor %}{% endfor %}",
        "{% set ns = namespace(s='x') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s }}",
        "{{ 'x'.ljust(1500000000) }}",
    ],
)
async def test_hostile_templates_are_400_quickly_and_the_sandbox_recovers(tmp_path: Path, hostile: str) -> None:
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "hostile", chat_template=hostile))
    started = time.monotonic()
    with pytest.raises(InvalidRequest):
        await render_chat(ChatFormat(tokenizer), USER)
    assert time.monotonic() - started < RENDER_SECONDS + 3
    fine = load_tokenizer(make_tokenizer_dir(tmp_path / "fine", chat_template=CHATML))
    assert "hello" in await render_chat(ChatFormat(fine), USER)


async def test_rendering_matches_transformers_for_real_templates(tmp_path: Path) -> None:
    tokenizer = load_tokenizer(make_tokenizer_dir(tmp_path / "chatml", chat_template=CHATML))
    messages = [{"role": "system", "content": "be brief"}, *USER, {"role": "assistant", "content": "hello"}, *USER]
    ours = await render_chat(ChatFormat(tokenizer), messages)
    theirs = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    with_tools = (
        "{{ bos_token }}{% for t in tools or [] %}{{ t.function | tojson(separators=(',', ':')) }}{% endfor %}"
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    )
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    assert await render_chat(ChatFormat(tokenizer, with_tools), USER, tools) == tokenizer.apply_chat_template(
        USER, tools=tools, chat_template=with_tools, tokenize=False, add_generation_prompt=True
    )


async def test_a_burst_of_renders_is_timed_per_render_not_from_the_queue(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from loraserve import templates

    # About 0.2 s of work per render here (the `*` goes through the sandbox's guarded operator).
    slow = (
        "{% for i in range(600) %}{% for j in range(600) %}{% set x = i * j %}{% endfor %}{% endfor %}"
        "{{ messages[0]['content'] }}"
    )
    chat = ChatFormat(load_tokenizer(make_tokenizer_dir(tmp_path / "slow", chat_template=slow)))
    monkeypatch.setattr(templates, "RENDER_SECONDS", 60.0)  # while warming up and measuring
    await asyncio.gather(render_chat(chat, USER), render_chat(chat, USER))  # both workers compile it once
    started = time.monotonic()
    await render_chat(chat, USER)
    one = time.monotonic() - started  # measured, so a busy machine only makes everything proportionally slower
    # Every render fits the limit (4 renders' time) with room to spare; twelve at once on two workers take
    # about 6 renders' time in all, so the last ones wait longer than the limit in the queue: that must not count.
    monkeypatch.setattr(templates, "RENDER_SECONDS", 4 * one)
    results = await asyncio.gather(*(render_chat(chat, USER) for _ in range(12)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, str)] == []
