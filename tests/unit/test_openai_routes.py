from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from loraserve.engine import EngineDead, EngineRejected
from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello world"}]


def _events(response_text: str) -> list[str]:
    return [line[len("data: ") :] for line in response_text.splitlines() if line.startswith("data: ")]


def test_chat_answers_in_openai_shape_with_true_usage(client: TestClient, engine: FakeEngine, model_dir) -> None:
    before = int(time.time())
    response = client.post(CHAT, json={"model": "tiny", "messages": USER, "max_tokens": 3})
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert before <= body["created"] <= int(time.time())
    assert body["model"] == "tiny"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hello worldhello", "refusal": None},
            "finish_reason": "length",
            "logprobs": None,
        }
    ]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    templated = tokenizer.apply_chat_template(USER, tokenize=False, add_generation_prompt=True)
    expected_prompt = len(tokenizer(templated, add_special_tokens=False)["input_ids"])
    assert body["usage"] == {
        "prompt_tokens": expected_prompt,
        "completion_tokens": 3,
        "total_tokens": expected_prompt + 3,
    }
    assert engine.calls[0][1] == tokenizer(templated, add_special_tokens=False)["input_ids"]


def test_two_requests_get_unique_ids(client: TestClient) -> None:
    ids = {client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 1}).json()["id"] for _ in range(3)}
    assert len(ids) == 3


def test_empty_model_and_model_path_mean_the_base_and_answer_as_its_served_name(client: TestClient, model_dir) -> None:
    for name in ("", "tiny", str(model_dir)):
        response = client.post(CHAT, json={"model": name, "messages": USER, "max_tokens": 1})
        assert response.status_code == 200, name
        # As OpenAI and vLLM: the model that answered, never an echo of the request ("" included).
        assert response.json()["model"] == "tiny"
        response = client.post(COMPLETIONS, json={"model": name, "prompt": "hello", "max_tokens": 1})
        assert response.json()["model"] == "tiny"


def test_every_stream_chunk_names_the_served_model(client: TestClient) -> None:
    for route, body in (
        (CHAT, {"model": "", "messages": USER}),
        (COMPLETIONS, {"model": "", "prompt": "hello"}),
    ):
        body |= {"max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
        with client.stream("POST", route, json=body) as response:
            chunks = [json.loads(e) for e in _events(response.read().decode())[:-1]]
        assert len(chunks) >= 3
        assert {c["model"] for c in chunks} == {"tiny"}, route


def test_unknown_model_is_404_and_never_reaches_the_engine(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(CHAT, json={"model": "not-an-adapter-name", "messages": USER})
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "The model `not-an-adapter-name` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }
    assert engine.calls == []


def test_chat_content_may_be_a_list_of_text_parts(client: TestClient, engine: FakeEngine) -> None:
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": " world"}]
    response = client.post(CHAT, json={"model": "", "messages": [{"role": "user", "content": parts}], "max_tokens": 1})
    assert response.status_code == 200
    plain = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 1})
    assert response.json()["usage"] == plain.json()["usage"]
    assert engine.calls[0][1] == engine.calls[1][1]


def test_image_parts_are_a_clear_400_naming_the_part(client: TestClient) -> None:
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": parts}]
    response = client.post(CHAT, json={"model": "", "messages": messages})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "messages[1].content[1]"
    assert "'image_url'" in error["message"] and "not supported" in error["message"]
    assert "Input should be" not in error["message"]


def test_nested_errors_name_the_parameter_as_openai_writes_it(client: TestClient) -> None:
    messages = [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "hi"}]
    error = client.post(CHAT, json={"model": "", "messages": messages}).json()["error"]
    assert error["param"] == "messages[1].role"
    error = client.post(CHAT, json={"model": "", "messages": [{"role": "user", "content": 5}]}).json()["error"]
    assert error["param"] == "messages[0].content"


def test_chat_stream_sends_role_first_finish_last_and_done(client: TestClient) -> None:
    body = {"model": "tiny", "messages": USER, "max_tokens": 3, "stream": True}
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = _events(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[-1]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == "hello worldhello"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


def test_chat_stream_usage_chunk_when_asked(client: TestClient) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", CHAT, json=body) as response:
        events = _events(response.read().decode())
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 2
    assert last["usage"]["total_tokens"] == last["usage"]["prompt_tokens"] + 2


def test_completions_plain_and_streamed_agree(client: TestClient) -> None:
    body = {"model": "", "prompt": "hello world", "max_tokens": 4}
    plain = client.post(COMPLETIONS, json=body).json()
    assert plain["id"].startswith("cmpl-")
    assert plain["object"] == "text_completion"
    assert plain["choices"][0]["text"] == "hello worldhello world"
    assert plain["usage"] == {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6}
    with client.stream("POST", COMPLETIONS, json={**body, "stream": True}) as response:
        events = _events(response.read().decode())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == plain["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_completions_accept_token_ids(client: TestClient, engine: FakeEngine) -> None:
    for prompt in ([6, 7], [[6, 7]]):
        response = client.post(COMPLETIONS, json={"model": "", "prompt": prompt, "max_tokens": 1})
        assert response.status_code == 200
        assert engine.calls[-1][1] == [6, 7]


def test_token_ids_outside_the_vocabulary_are_400(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(COMPLETIONS, json={"model": "", "prompt": [6, 99999], "max_tokens": 1})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert engine.calls == []


def test_stop_strings_reach_the_engine_and_end_with_stop(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(COMPLETIONS, json={"model": "", "prompt": "hello", "max_tokens": 10, "stop": " world"})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert " world" not in choice["text"]
    assert engine.calls[0][2].stop == (" world",)


def test_sampling_fields_map_to_engine_options(client: TestClient, engine: FakeEngine) -> None:
    client.post(
        CHAT,
        json={"model": "", "messages": USER, "max_completion_tokens": 5, "temperature": 0, "top_p": 0.5, "seed": 7},
    )
    options = engine.calls[0][2]
    assert (options.max_tokens, options.temperature, options.top_p, options.seed) == (5, 0.0, 0.5, 7)


def test_default_max_tokens_is_what_the_context_leaves(client: TestClient, engine: FakeEngine) -> None:
    client.post(COMPLETIONS, json={"model": "", "prompt": "hello world the"})
    assert engine.calls[0][2].max_tokens == engine.max_model_len - 3


def test_prompt_over_the_context_is_400(client: TestClient, engine: FakeEngine) -> None:
    response = client.post(COMPLETIONS, json={"model": "", "prompt": "hello " * 80})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "prompt"
    too_long = client.post(COMPLETIONS, json={"model": "", "prompt": "hello", "max_tokens": 64})
    assert too_long.json()["error"]["code"] == "context_length_exceeded"
    assert engine.calls == []


def test_too_many_max_tokens_names_the_parameter_to_change(client: TestClient, engine: FakeEngine) -> None:
    # The prompt fits; the asked-for completion does not: it is max_tokens the user must lower.
    error = client.post(COMPLETIONS, json={"model": "", "prompt": "hello", "max_tokens": 5000}).json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "max_tokens")
    assert f"at most {engine.max_model_len - 1}" in error["message"]
    for param in ("max_tokens", "max_completion_tokens"):
        error = client.post(CHAT, json={"model": "", "messages": USER, param: 5000}).json()["error"]
        assert (error["code"], error["param"]) == ("context_length_exceeded", param)
    # A prompt that alone fills the context is the prompt's fault, whatever max_tokens says.
    error = client.post(CHAT, json={"model": "", "messages": [{"role": "user", "content": "hello " * 80}],
                                    "max_tokens": 5000}).json()["error"]  # fmt: skip
    assert error["param"] == "messages"


def test_unknown_fields_are_accepted_and_ignored(client: TestClient) -> None:
    response = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 1, "brand_new_option": {"x": 1}})
    assert response.status_code == 200


def test_n_above_the_cap_is_a_clear_400(client: TestClient) -> None:
    response = client.post(CHAT, json={"model": "", "messages": USER, "n": 9})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "n"
    assert "--max-n" in response.json()["error"]["message"]


def test_engine_rejection_is_400_and_engine_death_is_503(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_with = EngineRejected("bad sampling", param="top_p")
    rejected = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 2})
    assert rejected.status_code == 400
    assert rejected.json()["error"] == {
        "message": "bad sampling",
        "type": "invalid_request_error",
        "param": "top_p",
        "code": None,
    }
    engine.fail_with = EngineDead("gone")
    dead = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 2, "stream": True})
    assert dead.status_code == 503
    assert dead.headers["retry-after"]
    assert dead.json()["error"]["type"] == "service_unavailable"


def test_unexpected_engine_error_is_500_without_internals_and_server_stays_up(
    client: TestClient, engine: FakeEngine
) -> None:
    engine.fail_with = RuntimeError("/secret/path/token=abc")
    response = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 2})
    assert response.status_code == 500
    assert "/secret" not in response.text
    assert response.json()["error"]["type"] == "server_error"
    engine.fail_with = None
    assert client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 1}).status_code == 200


def test_error_after_the_first_byte_goes_in_band_then_done(client: TestClient, engine: FakeEngine) -> None:
    engine.fail_with, engine.fail_after = RuntimeError("boom"), 2
    body = {"model": "", "messages": USER, "max_tokens": 5, "stream": True}
    with client.stream("POST", CHAT, json=body) as response:
        assert response.status_code == 200
        events = _events(response.read().decode())
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error"
    assert "boom" not in error["message"]
