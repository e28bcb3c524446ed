"""--api-key (401 on every route but /health, constant-time checks) and --max-concurrent-requests (429)."""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.requests import Request

from loraserve import access
from loraserve.app import create_app
from loraserve.config import Settings
from loraserve.errors import LORAX_PATHS
from loraserve.routes.openai import hub_token
from tests.unit.conftest import FakeEngine

KEY = "sk-test-0123456789"
CHAT = "/v1/chat/completions"
BODY = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture
def keyed(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings.model_copy(update={"api_key": SecretStr(KEY)}), engine=engine)) as client:
        yield client


def _routes(client: TestClient) -> list[tuple[str, str]]:
    return [
        (method, route.path)
        for route in client.app.routes  # type: ignore[attr-defined]
        if isinstance(route, APIRoute)
        for method in route.methods
    ]


def test_every_route_but_health_needs_the_key(keyed: TestClient) -> None:
    routes = _routes(keyed)
    assert ("POST", CHAT) in routes and ("GET", "/metrics") in routes
    for method, path in routes:
        response = keyed.request(method, path, json=BODY)
        if path == "/health":
            assert response.status_code == 200
            continue
        assert response.status_code == 401, (method, path)
        if path in LORAX_PATHS:  # LoRAX's routes answer in LoRAX's shape
            assert response.json()["error_type"] == "authentication"
            assert "Authorization" in response.json()["error"]
        else:
            error = response.json()["error"]
            assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"
            assert "Authorization" in error["message"]
        assert response.headers["www-authenticate"] == "Bearer"
    assert keyed.get("/no/such/route").status_code == 401  # unknown paths say nothing either


def test_the_right_key_passes_and_a_wrong_one_is_refused(keyed: TestClient) -> None:
    assert keyed.post(CHAT, json=BODY, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    for wrong in (f"Bearer {KEY}x", f"Bearer {KEY[:-1]}", "Bearer ", f"Basic {KEY}", KEY):
        response = keyed.post(CHAT, json=BODY, headers={"Authorization": wrong})
        assert response.status_code == 401, wrong
        assert response.json()["error"]["param"] is None
    assert keyed.get("/health").status_code == 200  # and the server is fine


def test_metrics_can_be_left_open_for_scrapers(settings: Settings, engine: FakeEngine) -> None:
    open_metrics = settings.model_copy(update={"api_key": SecretStr(KEY), "metrics_without_key": True})
    with TestClient(create_app(open_metrics, engine=engine)) as client:
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/models").status_code == 401


def test_a_key_file_holds_several_keys(settings: Settings, engine: FakeEngine, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("# rotated monthly\nsk-old\n\n  sk-new  \n")
    with TestClient(create_app(settings.model_copy(update={"api_key_file": keys}), engine=engine)) as client:
        for key in ("sk-old", "sk-new"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer # rotated monthly"}).status_code == 401


def test_a_key_file_without_keys_stops_the_start(settings: Settings, engine: FakeEngine, tmp_path: Path) -> None:
    empty = tmp_path / "keys"
    empty.write_text("# nothing yet\n")
    with pytest.raises(SystemExit, match="holds no key"):
        create_app(settings.model_copy(update={"api_key_file": empty}), engine=engine)
    with pytest.raises(SystemExit, match="cannot read"):
        create_app(settings.model_copy(update={"api_key_file": tmp_path / "missing"}), engine=engine)


def test_keys_are_compared_as_equal_length_digests_and_all_of_them(monkeypatch: pytest.MonkeyPatch) -> None:
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", spy)
    digests = [access._digest(k) for k in ("first", "second", "third")]
    assert access.key_matches("first", digests)  # a match early on does not stop the comparisons
    assert compared == [(32, 32)] * 3
    assert not access.key_matches("x" * 5000, digests)


def test_with_a_server_key_the_bearer_is_never_a_hub_token() -> None:
    def request(state: dict[str, object]) -> Request:
        headers = [(b"authorization", b"Bearer hf_looks_like_a_hub_token")]
        return Request({"type": "http", "headers": headers, "state": state})

    assert hub_token(None, request({})) == "hf_looks_like_a_hub_token"  # no server key: a Hub token
    assert hub_token(None, request({access.AUTHORIZED: True})) is None  # the server's key: not a Hub token
    assert hub_token("hf_body", request({access.AUTHORIZED: True})) == "hf_body"  # api_token still counts


def test_beyond_the_concurrency_limit_a_429_with_retry_after(settings: Settings) -> None:
    engine = FakeEngine(delay=0.1)
    limited = settings.model_copy(update={"max_concurrent_requests": 1})
    with TestClient(create_app(limited, engine=engine)) as client:
        slow = threading.Thread(target=lambda: client.post(CHAT, json={**BODY, "max_tokens": 20, "stream": True}))
        slow.start()
        deadline = time.monotonic() + 5
        while not engine.running and time.monotonic() < deadline:
            time.sleep(0.01)
        refused = client.post(CHAT, json=BODY)
        assert client.get("/health").status_code == 200  # only model requests count
        slow.join()
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert client.post(CHAT, json=BODY).status_code == 200  # the slot is free again
