"""Raw HTTP against the real server, as curl users see it: errors, health, disconnects."""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.e2e.conftest import RunningServer

USER = [{"role": "user", "content": "Tell me a long story about a dragon."}]


def test_health_and_models(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    models = httpx.get(f"{server.v1}/models").json()
    assert models["data"][0]["id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_unknown_model_is_404_model_not_found(server: RunningServer) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        server.client().chat.completions.create(model="no/such-adapter", messages=USER, max_tokens=2)
    assert caught.value.body == {
        "message": "The model `no/such-adapter` does not exist or you do not have access to it.",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


def test_bad_input_gets_openai_errors_and_the_server_stays_healthy(server: RunningServer) -> None:
    chat = f"{server.v1}/chat/completions"
    bad_json = httpx.post(chat, content=b'{"model": ', headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["type"] == "invalid_request_error"
    schema = httpx.post(chat, json={"model": "", "messages": "hello"})
    assert schema.status_code == 400 and schema.json()["error"]["param"].startswith("messages")
    long_prompt = httpx.post(f"{server.v1}/completions", json={"model": "", "prompt": "hello " * 3000})
    assert long_prompt.status_code == 400
    assert long_prompt.json()["error"]["code"] == "context_length_exceeded"
    too_many = httpx.post(chat, json={"model": "", "messages": USER, "max_tokens": 100_000})
    assert too_many.status_code == 400
    assert httpx.get(f"{server.url}/health").status_code == 200
    ok = httpx.post(chat, json={"model": "", "messages": USER, "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_client_disconnect_mid_stream_aborts_the_engine_request(server: RunningServer) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 1500, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.v1}/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(3):
            next(lines)
        assert httpx.get(f"{server.url}/info").json()["running_requests"] == 1
    # Leaving the block closed the connection mid-stream.
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/info").json()["running_requests"] != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.2)


def test_client_disconnect_before_a_plain_answer_aborts_too(server: RunningServer) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 1500, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.v1}/chat/completions", json=body, timeout=2)
    deadline = time.monotonic() + 20
    while httpx.get(f"{server.url}/info").json()["running_requests"] != 0:
        assert time.monotonic() < deadline, "the engine kept generating for a client that left"
        time.sleep(0.2)
