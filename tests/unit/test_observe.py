"""Every request gets an id (a client's X-Request-Id is kept), echoed back, and one structured log line."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from loraserve.generation import TokenProgress
from loraserve.observe import RequestRecord, log_line

CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "loraserve.requests"]


def test_a_client_request_id_is_echoed_and_logged(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "loraserve.requests")
    response = client.post(CHAT, json=BODY, headers={"X-Request-Id": "trace-42.a"})
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "trace-42.a"
    (line,) = _lines(caplog)
    assert line.startswith("request id=trace-42.a method=POST path=/v1/chat/completions status=200 model=tiny ")
    assert "prompt_tokens=" in line and "completion_tokens=3" in line and "ttft_s=0." in line


def test_without_one_the_server_makes_a_fresh_id_per_request(client: TestClient) -> None:
    ids = {client.get("/health").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3 and all(len(i) == 32 for i in ids)


def test_a_hostile_request_id_is_replaced_not_reflected(client: TestClient) -> None:
    response = client.get("/health", headers={"X-Request-Id": 'x" injected=1'})
    assert response.headers["x-request-id"] != 'x" injected=1'
    assert len(response.headers["x-request-id"]) == 32
    assert client.get("/health", headers={"X-Request-Id": "a" * 200}).headers["x-request-id"] != "a" * 200


def test_errors_and_refusals_carry_the_id_and_their_code(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "loraserve.requests")
    missing = client.post(CHAT, json={**BODY, "model": "acme/missing\n"}, headers={"X-Request-Id": "r1"})
    assert missing.status_code == 404 and missing.headers["x-request-id"] == "r1"
    too_big = client.post(CHAT, content=b"{" + b" " * 10_000 + b"}", headers={"X-Request-Id": "r2"})
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "r2"
    lines = _lines(caplog)
    assert "id=r1" in lines[0] and "status=404" in lines[0] and "error=model_not_found" in lines[0]
    assert "model=-" in lines[0]  # a name that did not resolve is not written to the log
    assert "id=r2" in lines[1] and "status=413" in lines[1]


def test_a_streamed_answer_is_logged_once_when_it_ends(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "loraserve.requests")
    response = client.post(CHAT, json={**BODY, "stream": True})
    assert response.status_code == 200 and response.text.rstrip().endswith("[DONE]")
    (line,) = _lines(caplog)
    assert "completion_tokens=3" in line and "status=200" in line


def test_probes_and_scrapes_log_at_debug_only(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "loraserve.requests")
    client.get("/health")
    client.get("/metrics")
    assert _lines(caplog) == []


def test_log_values_are_quoted_when_they_are_not_plain_tokens() -> None:
    record = RequestRecord("id1", "POST", "/v1/x y\nforged=1", status=400, progress=TokenProgress())
    line = log_line(record)
    assert "\n" not in line
    assert 'path="/v1/x y\\nforged=1"' in line
