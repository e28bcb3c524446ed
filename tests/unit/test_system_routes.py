from __future__ import annotations

from fastapi.testclient import TestClient

from tests.unit.conftest import FakeEngine


def test_health_is_200_when_the_engine_answers(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}


def test_health_is_503_when_the_engine_is_down(client: TestClient, engine: FakeEngine) -> None:
    engine.healthy = False
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json()["error"]["type"] == "service_unavailable"


def test_models_lists_the_base(client: TestClient, model_dir) -> None:
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [card["id"] for card in body["data"]] == ["tiny"]
    assert body["data"][0]["object"] == "model"
    assert body["data"][0]["root"] == str(model_dir)


def test_info_reports_the_model_and_running_requests(client: TestClient) -> None:
    info = client.get("/info").json()
    assert info["model_id"] == "tiny"
    assert info["running_requests"] == 0
