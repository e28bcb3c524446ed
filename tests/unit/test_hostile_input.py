"""Hostile and clumsy input: every JSON-legal value gets 200 or a 4xx naming its parameter, never a 5xx."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "hello"}]


def _post_raw(client: TestClient, route: str, raw: str) -> dict:
    response = client.post(route, content=raw.encode(), headers={"content-type": "application/json"})
    body = response.json()
    body["status"] = response.status_code
    return body


@pytest.mark.parametrize(
    ("route", "raw", "param"),
    [
        (CHAT, '{"model": "", "messages": [{"role": "user", "content": "a\\ud800b"}]}', "messages[0].content"),
        (CHAT, '{"model": "", "messages": [{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]}',
         "messages[0].content[0].text"),
        (CHAT, '{"model": "", "messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud83d"]}', "stop[0]"),
        (COMPLETIONS, '{"model": "", "prompt": "x\\udc00"}', "prompt"),
        (CHAT, '{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}', "model"),
    ],
)  # fmt: skip
def test_lone_surrogates_are_a_400_naming_the_field(
    client: TestClient, engine: FakeEngine, route: str, raw: str, param: str
) -> None:
    body = _post_raw(client, route, raw)
    assert body["status"] == 400, body
    assert body["error"]["param"] == param
    assert "surrogate" in body["error"]["message"]
    assert engine.calls == []
    assert client.get("/health").status_code == 200


def test_a_valid_surrogate_pair_is_an_ordinary_character(client: TestClient) -> None:
    raw = '{"model": "", "messages": [{"role": "user", "content": "smile \\ud83d\\ude00"}], "max_tokens": 1}'
    assert _post_raw(client, CHAT, raw)["status"] == 200


@pytest.mark.parametrize(
    ("field", "value"),
    [("max_tokens", "16"), ("n", "2"), ("temperature", "0.5"), ("stream", "true"), ("logprobs", 1),
     ("seed", 1.5), ("top_logprobs", True), ("max_tokens", 3.0)],
)  # fmt: skip
def test_numbers_and_booleans_are_as_strict_as_openai(client: TestClient, field: str, value: object) -> None:
    response = client.post(CHAT, json={"model": "", "messages": USER, field: value})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_integers_are_still_fine_where_a_number_is_wanted(client: TestClient) -> None:
    body = {"model": "", "messages": USER, "max_tokens": 1, "temperature": 1, "top_p": 1, "presence_penalty": 0}
    assert client.post(CHAT, json=body).status_code == 200


def test_a_huge_max_tokens_names_max_tokens(client: TestClient) -> None:
    error = client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 2**64}).json()["error"]
    assert error["param"] == "max_tokens"


def test_a_dangling_ref_in_a_json_schema_names_the_schema_without_internals(client: TestClient) -> None:
    schema = {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}
    body = {"model": "", "messages": USER, "response_format": {"type": "json_schema",
            "json_schema": {"name": "x", "schema": schema}}}  # fmt: skip
    response = client.post(CHAT, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "nowhere" in error["message"] and ".cc" not in error["message"]


@pytest.mark.parametrize("header_value", ["x" * 100_000])
def test_huge_request_headers_are_431(client: TestClient, header_value: str) -> None:
    response = client.post(CHAT, json={"model": "", "messages": USER}, headers={"x-big": header_value})
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "request_header_fields_too_large"
    assert client.get("/health").status_code == 200


def test_too_many_request_headers_are_431(client: TestClient) -> None:
    headers = {f"x-h{i}": "v" for i in range(200)}
    assert client.post(CHAT, json={"model": "", "messages": USER}, headers=headers).status_code == 431


def test_ordinary_headers_pass(client: TestClient) -> None:
    headers = {"authorization": "Bearer " + "k" * 200, "user-agent": "OpenAI/Python 1.0"}
    assert client.post(CHAT, json={"model": "", "messages": USER, "max_tokens": 1}, headers=headers).status_code == 200
