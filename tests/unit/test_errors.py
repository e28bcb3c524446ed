from __future__ import annotations

from fastapi.testclient import TestClient

CHAT = "/v1/chat/completions"


def _assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_malformed_json_is_400_not_422(client: TestClient) -> None:
    response = client.post(CHAT, content=b"{not json", headers={"content-type": "application/json"})
    error = _assert_openai_error(response, 400)
    assert "JSON" in error["message"]


def test_body_that_is_not_an_object_is_400(client: TestClient) -> None:
    error = _assert_openai_error(client.post(CHAT, json=[1, 2]), 400)
    assert "JSON object" in error["message"]


def test_missing_field_names_its_param(client: TestClient) -> None:
    error = _assert_openai_error(client.post(CHAT, json={"model": ""}), 400)
    assert error["param"] == "messages"
    assert error["type"] == "invalid_request_error"


def test_out_of_range_values_name_their_param(client: TestClient) -> None:
    for field, value in (("temperature", -1), ("top_p", 0), ("max_tokens", -5), ("max_tokens", 0)):
        body = {"model": "", "messages": [{"role": "user", "content": "hello"}], field: value}
        error = _assert_openai_error(client.post(CHAT, json=body), 400)
        assert error["param"] == field


def test_unknown_route_and_wrong_method_are_openai_shaped(client: TestClient) -> None:
    _assert_openai_error(client.get("/v1/nothing"), 404)
    _assert_openai_error(client.get(CHAT), 405)


def test_oversized_body_is_413(client: TestClient) -> None:
    big = {"model": "", "messages": [{"role": "user", "content": "hello " * 2000}]}
    error = _assert_openai_error(client.post(CHAT, json=big), 413)
    assert "4096" in error["message"]
    assert client.get("/health").status_code == 200


def test_oversized_chunked_body_is_413_too(client: TestClient) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"hello " * 10
        yield b'"}]}'

    response = client.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    error = _assert_openai_error(response, 413)
    assert error["code"] == "request_too_large"


def test_explicit_nulls_mean_the_defaults(client: TestClient) -> None:
    body = {"model": "", "messages": [{"role": "user", "content": "hello"}], "n": None, "stream": None,
            "presence_penalty": None, "logprobs": None, "max_tokens": 1, "stop": None}  # fmt: skip
    assert client.post(CHAT, json=body).status_code == 200


def test_an_empty_prompt_list_is_400(client: TestClient) -> None:
    error = _assert_openai_error(client.post("/v1/completions", json={"model": "", "prompt": []}), 400)
    assert error["param"] == "prompt"
