"""The real stack through the official OpenAI SDK, as LoRAX's docs use it."""

from __future__ import annotations

import time

from transformers import AutoTokenizer

from tests.e2e.conftest import RunningServer

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]


def test_greedy_chat_answers_berlin_with_true_usage(server: RunningServer) -> None:
    response = server.client().chat.completions.create(model="", messages=QUESTION, max_tokens=16, temperature=0)
    assert response.id.startswith("chatcmpl-")
    assert abs(response.created - time.time()) < 120
    assert response.model == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model that answered, not an echo
    choice = response.choices[0]
    assert "Berlin" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    templated = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    assert response.usage is not None
    assert response.usage.prompt_tokens == len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_streamed_chat_equals_the_plain_answer(server: RunningServer) -> None:
    client = server.client()
    name = client.models.list().data[0].id
    plain = client.chat.completions.create(model=name, messages=QUESTION, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=name, messages=QUESTION, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishing = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finishing) == 1 and finishing[0].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage is not None and plain.usage is not None
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_completions_plain_and_streamed(server: RunningServer) -> None:
    client = server.client()
    plain = client.completions.create(model="", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert plain.id.startswith("cmpl-")
    assert "Paris" in plain.choices[0].text
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage is not None and plain.usage.completion_tokens <= 8
    streamed = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=8, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == plain.choices[0].text


def test_max_tokens_ends_with_length(server: RunningServer) -> None:
    response = server.client().completions.create(model="", prompt="Count: 1, 2, 3,", max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 3


def test_stop_string_is_not_emitted(server: RunningServer) -> None:
    client = server.client()
    full = client.completions.create(model="", prompt="The capital of France is", max_tokens=8, temperature=0)
    stop_word = full.choices[0].text.split()[1]  # a word the model does write
    cut = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=8, temperature=0, stop=[stop_word]
    )
    assert cut.choices[0].finish_reason == "stop"
    assert stop_word not in cut.choices[0].text
    assert full.choices[0].text.startswith(cut.choices[0].text)


def test_same_seed_same_sample(server: RunningServer) -> None:
    client = server.client()
    answers = {
        client.completions.create(model="", prompt="Once upon a time", max_tokens=8, temperature=1.0, seed=1234)
        .choices[0]
        .text
        for _ in range(2)
    }
    assert len(answers) == 1
