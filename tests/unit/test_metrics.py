"""/metrics with the fake engine: loraserve's own series move by exactly what the requests did."""

from __future__ import annotations

from fastapi.testclient import TestClient

from loraserve.config import Settings
from tests.support.metrics import names, samples, value
from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


def _chat(client: TestClient, model: str, **extra: object) -> int:
    body = {"model": model, "adapter_source": "local", "messages": USER, "max_tokens": 2, **extra}
    return client.post(CHAT, json=body).status_code


def _page(client: TestClient) -> str:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


def test_requests_tokens_and_latency_by_model(adapter_client: TestClient) -> None:
    before = _page(adapter_client)
    assert _chat(adapter_client, "tiny") == 200
    assert _chat(adapter_client, "plain") == 200
    assert _chat(adapter_client, "plain", stream=True) == 200
    assert _chat(adapter_client, "no-such-adapter") == 404
    assert _chat(adapter_client, "plain", max_tokens=5000) == 400  # a known adapter, then refused
    after = _page(adapter_client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("loraserve_requests_total", model="tiny", endpoint=CHAT, status="200") == 1
    assert moved("loraserve_requests_total", model="plain", endpoint=CHAT, status="200") == 2
    assert moved("loraserve_requests_total", model="plain", endpoint=CHAT, status="400") == 1
    # A name that never resolved gets no label of its own.
    assert moved("loraserve_requests_total", model="other", endpoint=CHAT, status="404") == 1
    assert not any(("no-such-adapter" in str(labels)) for _, labels in samples(after))
    assert moved("loraserve_completion_tokens_total", model="plain") == 4
    assert moved("loraserve_completion_tokens_total", model="tiny") == 2
    assert moved("loraserve_prompt_tokens_total", model="plain") > 0
    assert moved("loraserve_time_to_first_token_seconds_count", model="plain") == 2
    assert moved("loraserve_request_duration_seconds_count", model="plain") == 2  # answered ones only


def test_cache_series_count_hits_misses_downloads_and_engine_loads(adapter_client: TestClient) -> None:
    before = _page(adapter_client)
    for _ in range(3):
        assert _chat(adapter_client, "plain") == 200
    after = _page(adapter_client)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("loraserve_adapter_cache_misses_total") == 1
    assert moved("loraserve_adapter_downloads_total") == 1
    assert moved("loraserve_adapter_cache_hits_total") == 2
    assert moved("loraserve_adapter_engine_loads_total") == 1
    assert moved("loraserve_adapter_download_bytes_total") > 0
    assert value(after, "loraserve_adapter_cache_used_bytes") == moved("loraserve_adapter_download_bytes_total")
    assert value(after, "loraserve_adapters", state="disk") == 1
    assert value(after, "loraserve_adapters", state="engine") == 1
    assert value(after, "loraserve_adapters", state="pinned") == 0
    assert value(after, "loraserve_adapter_cache_budget_bytes") == 10 * 1024**3


def test_evictions_from_disk_and_engine(adapter_settings: Settings, engine: FakeEngine) -> None:
    from loraserve.app import create_app

    one_adapter = adapter_settings.model_copy(update={"adapter_cache_size": 3000})
    with TestClient(create_app(one_adapter, engine=engine)) as client:
        assert _chat(client, "plain") == 200
        assert _chat(client, "templated") == 200  # makes room: "plain" leaves disk and engine
        page = _page(client)
    assert value(page, "loraserve_adapter_evictions_total", where="disk") == 1
    assert value(page, "loraserve_adapter_evictions_total", where="engine") == 1
    assert len(engine.loras) == 1


def test_the_page_holds_the_process_registry_too(client: TestClient) -> None:
    # vLLM records into prometheus_client's process registry; with the fake engine that registry still
    # has prometheus_client's own process series, which shows it is on the page.
    page = _page(client)
    assert "python_info" in names(page) or "python_gc_objects_collected" in names(page)
    assert "loraserve_requests" in names(page)
