"""The OpenAI request surface through HTTP with the fake engine: n, logprobs, echo, best_of,
multiple prompts, structured output, tools, and the validation of each."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from loraserve.engine import StructuredOutput
from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello world"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def _events(text: str) -> list[dict]:
    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _error(response) -> dict:  # type: ignore[no-untyped-def]
    assert response.status_code == 400, response.text
    return response.json()["error"]


def test_n_gives_n_choices_and_counts_all_their_tokens(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(CHAT, json={"model": "", "messages": USER, "n": 3, "max_tokens": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert body["choices"][0]["message"]["content"] != body["choices"][1]["message"]["content"]
    assert body["usage"]["completion_tokens"] == 6
    assert engine.calls[0][2].n == 3


def test_streamed_n_sends_a_role_chunk_and_a_finish_per_choice(client: TestClient) -> None:
    body = {"model": "", "messages": USER, "n": 2, "max_tokens": 2, "stream": True}
    with client.stream("POST", CHAT, json=body) as response:
        chunks = _events(response.read().decode())
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert [c["finish_reason"] for c in mine].count("length") == 1 and mine[-1]["finish_reason"] == "length"


def test_chat_logprobs_have_openai_shape(client: TestClient) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 2}
    logprobs = client.post(CHAT, json=body).json()["choices"][0]["logprobs"]
    assert len(logprobs["content"]) == 2
    first = logprobs["content"][0]
    assert first["token"] == "hello" and first["bytes"] == list(b"hello")
    assert first["logprob"] == -0.5
    assert [t["token"] for t in first["top_logprobs"]] == ["alt0", "alt1"]


def test_chat_logprobs_stream_with_each_chunk(client: TestClient) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 2, "logprobs": True, "stream": True}
    with client.stream("POST", CHAT, json=body) as response:
        chunks = _events(response.read().decode())
    content = [c["choices"][0] for c in chunks if c["choices"][0]["delta"].get("content")]
    assert all(len(c["logprobs"]["content"]) == 1 for c in content)


@pytest.mark.parametrize(
    ("field", "value", "param"),
    [("top_logprobs", 21, "top_logprobs"), ("n", 0, "n"), ("presence_penalty", 3, "presence_penalty"),
     ("frequency_penalty", -3, "frequency_penalty"), ("logit_bias", {"x": 1}, "logit_bias"),
     ("logit_bias", {"5": 101}, "logit_bias.5"), ("logit_bias", {"99999": 1}, "logit_bias"),
     ("min_p", 2, "min_p"), ("top_k", -2, "top_k"), ("repetition_penalty", 0, "repetition_penalty"),
     ("min_tokens", 999, "min_tokens"), ("seed", 2**64, "seed"), ("stop", ["x"] * 17, "stop")],
)  # fmt: skip
def test_out_of_range_parameters_are_400_naming_them(client: TestClient, field: str, value: object, param: str) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 4, field: value}
    if field == "top_logprobs":
        body["logprobs"] = True
    assert _error(client.post(CHAT, json=body))["param"] == param


def test_top_logprobs_needs_logprobs(client: TestClient) -> None:
    assert _error(client.post(CHAT, json={"model": "", "messages": USER, "top_logprobs": 2}))["param"] == "top_logprobs"


def test_vllm_extras_and_penalties_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    body = {
        "model": "", "messages": USER, "max_tokens": 3, "presence_penalty": 0.5, "frequency_penalty": -0.5,
        "logit_bias": {"6": -100}, "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "min_tokens": 2,
        "ignore_eos": True, "skip_special_tokens": False, "user": "someone",
    }  # fmt: skip
    assert client.post(CHAT, json=body).status_code == 200
    options = engine.calls[0][2]
    assert (options.presence_penalty, options.frequency_penalty, options.logit_bias) == (0.5, -0.5, ((6, -100.0),))
    assert (options.top_k, options.min_p, options.repetition_penalty) == (5, 0.1, 1.2)
    assert (options.min_tokens, options.ignore_eos, options.skip_special_tokens) == (2, True, False)


def test_completions_take_several_prompts_and_token_ids(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(
        COMPLETIONS, json={"model": "", "prompt": ["hello", "world the"], "n": 2, "max_tokens": 1}
    ).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["prompt_tokens"] == 3
    assert [call[1] for call in engine.calls] == [[6], [7, 8]]
    batched = client.post(COMPLETIONS, json={"model": "", "prompt": [[6, 7], [8]], "max_tokens": 1}).json()
    assert len(batched["choices"]) == 2


def test_completions_echo_and_legacy_logprobs(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": "", "prompt": "hello world", "max_tokens": 2, "echo": True, "logprobs": 1}
    choice = client.post(COMPLETIONS, json=body).json()["choices"][0]
    assert choice["text"] == "hello world" + "hello world"
    logprobs = choice["logprobs"]
    assert logprobs["token_logprobs"][0] is None  # the first prompt token has none
    assert logprobs["tokens"][0] == "hello"
    assert len(logprobs["tokens"]) == 4
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert engine.calls[0][2].prompt_logprobs == 1


def test_streamed_echo_sends_the_prompt_first(client: TestClient) -> None:
    body = {"model": "", "prompt": "hello world", "max_tokens": 2, "echo": True, "stream": True}
    with client.stream("POST", COMPLETIONS, json=body) as response:
        chunks = _events(response.read().decode())
    assert chunks[0]["choices"][0]["text"] == "hello world"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "hello worldhello world"


def test_best_of_returns_the_n_most_likely(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(COMPLETIONS, json={"model": "", "prompt": "hello", "max_tokens": 2, "best_of": 3}).json()
    assert len(body["choices"]) == 1
    assert engine.calls[0][2].n == 3
    assert body["choices"][0]["logprobs"] is None  # not asked for
    assert (
        _error(client.post(COMPLETIONS, json={"model": "", "prompt": "x", "best_of": 1, "n": 2}))["param"] == "best_of"
    )
    streamed = {"model": "", "prompt": "x", "best_of": 2, "stream": True}
    assert _error(client.post(COMPLETIONS, json=streamed))["param"] == "best_of"


def test_suffix_and_response_format_on_completions_are_400(client: TestClient) -> None:
    assert _error(client.post(COMPLETIONS, json={"model": "", "prompt": "x", "suffix": "y"}))["param"] == "suffix"
    error = _error(
        client.post(COMPLETIONS, json={"model": "", "prompt": "x", "response_format": {"type": "json_object"}})
    )
    assert error["param"] == "response_format" and "chat" in error["message"]


def test_response_format_becomes_a_decoding_constraint(client: TestClient, engine: FakeEngine) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {"model": "", "messages": USER, "max_tokens": 1,
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    assert client.post(CHAT, json=body).status_code == 200
    assert engine.calls[-1][2].structured == StructuredOutput("json", schema)
    body["response_format"] = {"type": "json_object"}
    client.post(CHAT, json=body)
    assert engine.calls[-1][2].structured == StructuredOutput("json_object")


def test_a_schema_that_is_not_a_schema_is_400(client: TestClient) -> None:
    bad = {"name": "x", "schema": {"type": "no-such-type"}}
    body = {"model": "", "messages": USER, "response_format": {"type": "json_schema", "json_schema": bad}}
    assert _error(client.post(CHAT, json=body))["param"] == "response_format.json_schema.schema"
    body["response_format"] = {"type": "json_schema"}
    assert _error(client.post(CHAT, json=body))["param"] == "response_format.json_schema"


def test_tools_named_twice_or_unknown_choice_are_400(client: TestClient) -> None:
    twice = {"model": "", "messages": USER, "tools": [WEATHER, WEATHER]}
    assert _error(client.post(CHAT, json=twice))["param"] == "tools"
    unknown = {"model": "", "messages": USER, "tools": [WEATHER],
               "tool_choice": {"type": "function", "function": {"name": "nope"}}}  # fmt: skip
    assert _error(client.post(CHAT, json=unknown))["param"] == "tool_choice"
    required = {"model": "", "messages": USER, "tool_choice": "required"}
    assert _error(client.post(CHAT, json=required))["param"] == "tool_choice"


def test_named_tool_choice_constrains_and_returns_tool_calls(client: TestClient, engine: FakeEngine) -> None:
    engine.words = ['{"name": "get_weather", "arguments": {"city": "Paris"}}']
    body = {"model": "", "messages": USER, "max_tokens": 1, "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}  # fmt: skip
    choice = client.post(CHAT, json=body).json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}
    constraint = engine.calls[-1][2].structured
    assert constraint is not None and constraint.kind == "json"
    assert constraint.spec["properties"]["name"] == {"const": "get_weather"}


def test_auto_tools_parse_hermes_calls_and_leave_plain_answers(client: TestClient, engine: FakeEngine) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 1, "tools": [WEATHER]}
    engine.words = ['<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']
    called = client.post(CHAT, json=body).json()["choices"][0]
    assert called["finish_reason"] == "tool_calls"
    assert engine.calls[-1][2].structured is None
    engine.words = ["It is sunny."]
    plain = client.post(CHAT, json=body).json()["choices"][0]
    assert plain["message"] == {"role": "assistant", "content": "It is sunny.", "refusal": None}


def test_streamed_tool_calls_arrive_as_delta_tool_calls(client: TestClient, engine: FakeEngine) -> None:
    engine.words = ['{"name": "get_weather",', ' "arguments": {"city": "Rome"}}']
    body = {"model": "", "messages": USER, "max_tokens": 2, "tools": [WEATHER], "tool_choice": "required",
            "stream": True}  # fmt: skip
    with client.stream("POST", CHAT, json=body) as response:
        chunks = _events(response.read().decode())
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert len(calls) == 1 and calls[0][0]["function"]["name"] == "get_weather"
    assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Rome"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any(d.get("content") for d in deltas)


def test_auto_tools_stream_plain_answers_as_content(client: TestClient, engine: FakeEngine) -> None:
    engine.words = ["Sunny", " today"]
    body = {"model": "", "messages": USER, "max_tokens": 2, "tools": [WEATHER], "stream": True}
    with client.stream("POST", CHAT, json=body) as response:
        chunks = _events(response.read().decode())
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == "Sunny today"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_greedy_n_asks_the_engine_once_and_copies(client: TestClient, engine: FakeEngine) -> None:
    body = client.post(CHAT, json={"model": "", "messages": USER, "n": 3, "max_tokens": 2, "temperature": 0}).json()
    assert len(engine.calls) == 1 and engine.calls[0][2].n == 1
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert len({c["message"]["content"] for c in body["choices"]}) == 1
    assert body["usage"]["completion_tokens"] == 6
    stream = {"model": "", "prompt": ["hello", "world"], "n": 2, "max_tokens": 1, "temperature": 0, "stream": True}
    with client.stream("POST", COMPLETIONS, json=stream) as response:
        chunks = _events(response.read().decode())
    assert {c["choices"][0]["index"] for c in chunks} == {0, 1, 2, 3}


def test_auto_tools_treat_text_before_a_call_as_content_streamed_or_not(client: TestClient, engine: FakeEngine) -> None:
    engine.words = ['Sure <tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>']
    body = {"model": "", "messages": USER, "max_tokens": 1, "tools": [WEATHER]}
    plain = client.post(CHAT, json=body).json()["choices"][0]
    with client.stream("POST", CHAT, json={**body, "stream": True}) as response:
        chunks = _events(response.read().decode())
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert plain["finish_reason"] == chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert plain["message"]["content"] == streamed
