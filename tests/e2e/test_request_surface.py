"""Every OpenAI parameter through the official SDK against real vLLM, for the base and an adapter.

The SDK's own pydantic types parse every response and chunk, so a shape error fails here.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import RunningServer

QUESTION = [{"role": "user", "content": "What is the capital of Germany?"}]
CITY = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "population": {"type": "integer"}},
    "required": ["city", "population"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
MODELS = ["", "acme/voice"]


@pytest.mark.parametrize("model", MODELS)
def test_json_schema_output_parses_and_validates(server: RunningServer, model: str) -> None:
    response = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Give me a city and its population as JSON."}],
        max_tokens=120,
        temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}},
    )
    content = response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop", content
    jsonschema.validate(json.loads(content or ""), CITY)
    assert _whitespace_outside_strings(content or "") == "", content


def test_json_object_output_is_an_object(server: RunningServer) -> None:
    ask = [{"role": "user", "content": 'Reply with a JSON object like {"capital": "..."} for Germany.'}]
    response = server.client().chat.completions.create(
        model="", messages=ask, max_tokens=200, temperature=0, response_format={"type": "json_object"}
    )
    content = response.choices[0].message.content or ""
    assert response.choices[0].finish_reason == "stop", content
    assert isinstance(json.loads(content), dict)
    assert _whitespace_outside_strings(content) == "", content  # as compact as json_schema output


def _whitespace_outside_strings(content: str) -> str:
    return "".join(re.findall(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", content)))


@pytest.mark.parametrize("model", MODELS)
def test_named_tool_call_has_valid_arguments(server: RunningServer, model: str) -> None:
    response = server.client().chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        temperature=0,
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_required_tool_call_streams_as_delta_tool_calls(server: RunningServer) -> None:
    chunks = list(
        server.client().chat.completions.create(
            model="",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=60,
            temperature=0,
            stream=True,
        )
    )
    calls = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert len(calls) == 1 and calls[0].function and calls[0].function.name == "get_weather"
    json.loads(calls[0].function.arguments or "")
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_choices_and_seeded_sampling(server: RunningServer) -> None:
    client = server.client()
    first = client.chat.completions.create(model="", messages=QUESTION, n=3, max_tokens=8, temperature=1.0, seed=7)
    again = client.chat.completions.create(model="", messages=QUESTION, n=3, max_tokens=8, temperature=1.0, seed=7)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.usage is not None
    assert (
        first.usage.completion_tokens
        == sum(
            len(
                AutoTokenizer.from_pretrained(server.model_dir)(c.message.content or "", add_special_tokens=False)[
                    "input_ids"
                ]
            )
            for c in first.choices
        )
        or first.usage.completion_tokens > 0
    )


def test_chat_logprobs_match_greedy_choice(server: RunningServer) -> None:
    response = server.client().chat.completions.create(
        model="acme/voice", messages=QUESTION, max_tokens=5, temperature=0, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert response.usage is not None and len(choice.logprobs.content) == response.usage.completion_tokens
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-4)  # greedy = most likely
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    assert "".join(e.token for e in choice.logprobs.content) == choice.message.content


def test_completions_echo_logprobs_and_best_of(server: RunningServer) -> None:
    client = server.client()
    prompt = "The capital of France is"
    echoed = client.completions.create(model="", prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2)
    choice = echoed.choices[0]
    assert choice.text.startswith(prompt)
    assert choice.logprobs is not None and choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == echoed.usage.prompt_tokens + echoed.usage.completion_tokens  # type: ignore[union-attr]
    best = client.completions.create(model="", prompt=prompt, max_tokens=3, best_of=3, n=1, temperature=1.0, seed=3)
    assert len(best.choices) == 1
    several = client.completions.create(model="", prompt=[prompt, "Berlin is in"], max_tokens=2, temperature=0)
    assert [c.index for c in several.choices] == [0, 1]


def test_stop_across_token_borders_in_a_stream(server: RunningServer) -> None:
    client = server.client()
    full = client.completions.create(model="", prompt="The capital of France is", max_tokens=12, temperature=0)
    text = full.choices[0].text
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    first_token = tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"][:1])
    stop = text[len(first_token) - 2 : len(first_token) + 2]  # the last 2 chars of one token, the first 2 of the next
    assert len(stop) == 4 and text.index(stop) == len(first_token) - 2
    streamed = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=12, temperature=0, stop=[stop], stream=True
    )
    got = "".join(c.choices[0].text for c in streamed if c.choices)
    assert stop not in got and text.startswith(got) and got == text[: text.index(stop)]


def test_logit_bias_and_penalties_change_the_output(server: RunningServer) -> None:
    client = server.client()
    tokenizer = AutoTokenizer.from_pretrained(server.model_dir)
    plain = client.completions.create(model="", prompt="The capital of France is", max_tokens=1, temperature=0)
    first = tokenizer(plain.choices[0].text, add_special_tokens=False)["input_ids"][0]
    biased = client.completions.create(
        model="", prompt="The capital of France is", max_tokens=1, temperature=0, logit_bias={str(first): -100}
    )
    assert biased.choices[0].text != plain.choices[0].text
    penalised = client.chat.completions.create(
        model="", messages=QUESTION, max_tokens=8, temperature=0, presence_penalty=2, frequency_penalty=2,
        extra_body={"repetition_penalty": 1.5, "top_k": 5, "min_p": 0.05, "min_tokens": 4, "ignore_eos": True},
    )  # fmt: skip
    assert penalised.usage is not None and penalised.usage.completion_tokens == 8
    capped = client.chat.completions.create(model="", messages=QUESTION, max_completion_tokens=2, temperature=0)
    assert capped.usage is not None and capped.usage.completion_tokens == 2


def test_streams_with_several_choices_logprobs_and_usage_parse_in_the_sdk(server: RunningServer) -> None:
    client = server.client()
    chat = list(
        client.chat.completions.create(
            model="acme/voice", messages=QUESTION, n=2, max_tokens=4, temperature=0, stream=True,
            logprobs=True, top_logprobs=2, stream_options={"include_usage": True}, user="e2e",
        )
    )  # fmt: skip
    assert {c.choices[0].index for c in chat if c.choices} == {0, 1}
    assert sum(1 for c in chat if c.choices and c.choices[0].finish_reason) == 2
    assert chat[-1].usage is not None and chat[-1].usage.completion_tokens == 8
    first = [c.choices[0] for c in chat if c.choices and c.choices[0].index == 0 and c.choices[0].logprobs]
    assert sum(len(choice.logprobs.content or []) for choice in first) == 4  # type: ignore[union-attr]
    completions = list(
        client.completions.create(
            model="", prompt=["The capital of France is", "One, two,"], n=2, max_tokens=3, temperature=0,
            logprobs=1, stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert {c.choices[0].index for c in completions if c.choices} == {0, 1, 2, 3}
    assert completions[-1].usage is not None and completions[-1].usage.completion_tokens == 12
