"""Adapters through HTTP with the fake engine: naming, loading, templates, errors, listing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraserve.app import create_app
from loraserve.config import Settings
from tests.unit.adapters.helpers import write_adapter, write_base
from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


def _chat(client: TestClient, model: str) -> dict:
    response = client.post(CHAT, json={"model": model, "adapter_source": "local", "messages": USER, "max_tokens": 1})
    return {"status": response.status_code, **response.json()}


def test_a_local_adapter_reaches_the_engine_as_a_lora(adapter_client: TestClient, engine: FakeEngine) -> None:
    answer = _chat(adapter_client, "plain")
    assert answer["status"] == 200
    assert answer["model"] == "plain"  # the adapter answered, and says so
    lora = engine.calls[-1][3]
    assert lora is not None and lora.int_id >= 1
    assert engine.loras[lora.int_id].path == lora.path
    # Each request names the adapter as the client did (vllm:lora_requests_info shows these names).
    assert lora.name == "plain"
    assert _chat(adapter_client, "plain")["status"] == 200
    assert engine.calls[-1][3] == lora  # same snapshot, same id: loaded once


def test_adapter_template_wins_over_the_base(adapter_client: TestClient, engine: FakeEngine) -> None:
    plain = _chat(adapter_client, "plain")
    own = _chat(adapter_client, "templated")
    # The adapter's template renders "system hello the end": 4 words of the tiny vocabulary.
    assert own["usage"]["prompt_tokens"] == 4
    assert plain["usage"]["prompt_tokens"] != 4


def test_adapter_for_modules_the_base_lacks_is_400(adapter_client: TestClient, engine: FakeEngine) -> None:
    result = _chat(adapter_client, "wrong")
    assert result["status"] == 400
    assert result["error"]["code"] == "invalid_adapter"
    assert engine.calls == []


def test_engine_refusal_is_400_and_the_server_stays_up(adapter_client: TestClient, engine: FakeEngine) -> None:
    engine.reject_loras = True
    result = _chat(adapter_client, "plain")
    assert result["status"] == 400 and "unsupported adapter" in result["error"]["message"]
    engine.reject_loras = False
    assert _chat(adapter_client, "plain")["status"] == 200


def test_requests_that_follow_add_lora_before_its_answer(adapter_client: TestClient, engine: FakeEngine) -> None:
    engine.pipeline_loras, engine.lora_answer_delay = True, 0.05
    assert _chat(adapter_client, "plain")["status"] == 200
    lora = engine.calls[-1][3]
    assert lora is not None and lora.loaded is not None  # sent before the engine had answered add_lora
    assert engine.loras[lora.int_id].path == lora.path
    assert _chat(adapter_client, "plain")["status"] == 200
    later = engine.calls[-1][3]
    assert later == lora and later is not None and later.loaded is None  # loaded now: nothing to wait for


@pytest.mark.parametrize("stream", [False, True])
def test_a_refusal_after_the_request_was_sent_is_still_a_400(
    adapter_client: TestClient, engine: FakeEngine, stream: bool
) -> None:
    engine.pipeline_loras, engine.lora_answer_delay, engine.reject_loras = True, 0.05, True
    body = {"model": "plain", "adapter_source": "local", "messages": USER, "max_tokens": 1, "stream": stream}
    response = adapter_client.post(CHAT, json=body)
    assert response.status_code == 400  # not a 200 whose stream then carries an error
    error = response.json()["error"]
    assert error["code"] == "invalid_adapter" and "could not load plain: unsupported adapter" in error["message"]
    assert engine.calls and engine.running == set()
    engine.reject_loras = False
    assert _chat(adapter_client, "plain")["status"] == 200  # loaded afresh, under a new id
    assert engine.calls[-1][3] is not None and engine.calls[-1][3].int_id != engine.calls[0][3].int_id


def test_traversal_names_are_404_without_touching_disk(adapter_client: TestClient) -> None:
    for name in ("../adapters/plain", "/etc", "plain/../../x"):
        result = _chat(adapter_client, name)
        assert result["status"] == 404 and result["error"]["code"] == "model_not_found"


def test_models_lists_cached_adapters_with_parent_and_root(adapter_client: TestClient) -> None:
    _chat(adapter_client, "plain")
    cards = adapter_client.get("/v1/models").json()["data"]
    adapter = next(c for c in cards if c["id"] == "plain")
    assert adapter["parent"] == "tiny"
    assert adapter["root"].startswith("plain@")


def test_leases_are_released_after_each_request(adapter_client: TestClient) -> None:
    _chat(adapter_client, "plain")
    services = adapter_client.app.state.services  # type: ignore[attr-defined]
    assert all(entry.leases == 0 for entry in services.catalog._adapters.entries())


def test_every_way_a_request_ends_releases_its_adapter_exactly_once(
    adapter_client: TestClient, engine: FakeEngine
) -> None:
    def in_flight() -> int:
        return sum(row["in_flight"] for row in adapter_client.get("/v1/adapters").json()["data"])

    base = {"model": "plain", "adapter_source": "local", "max_tokens": 2}
    chat, completion = {**base, "messages": USER}, {**base, "prompt": "hello"}
    endings = [
        ("plain chat", CHAT, chat, 200),
        ("streamed chat", CHAT, {**chat, "stream": True}, 200),
        ("streamed completion", "/v1/completions", {**completion, "stream": True}, 200),
        ("after resolving, the context is too small", CHAT, {**chat, "max_tokens": 5000}, 400),
        ("min_tokens above max_tokens", "/v1/completions", {**completion, "min_tokens": 9}, 400),
    ]
    for name, route, body, status in endings:
        assert adapter_client.post(route, json=body).status_code == status, name
        assert in_flight() == 0, name
    engine.fail_with = RuntimeError("boom")  # the engine fails at admission
    assert adapter_client.post(CHAT, json={**chat, "stream": True}).status_code == 500
    assert adapter_client.post(CHAT, json=chat).status_code == 500
    assert in_flight() == 0
    engine.fail_with, engine.fail_after = RuntimeError("boom"), 1  # and mid-stream
    response = adapter_client.post(CHAT, json={**chat, "stream": True})
    assert '"error"' in response.text and response.text.rstrip().endswith("data: [DONE]")
    assert in_flight() == 0


def test_adapters_route_reports_cache_and_cold_load_timings(adapter_client: TestClient) -> None:
    _chat(adapter_client, "plain")
    body = adapter_client.get("/v1/adapters").json()
    assert body["cache"]["entries"] == 1 and body["cache"]["used_bytes"] > 0
    row = body["data"][0]
    assert row["id"] == "plain" and row["source"] == "local" and row["in_flight"] == 0
    assert row["lora_id"] >= 1
    assert row["download_seconds"] >= 0 and row["load_seconds"] >= 0 and row["resolve_seconds"] >= 0


def test_preloaded_adapters_are_loaded_at_start_and_pinned(
    model_dir: Path, adapter_root: Path, tmp_path: Path, engine: FakeEngine
) -> None:
    write_base(model_dir)
    settings = Settings(
        model=str(model_dir), cache_dir=tmp_path / "cache", adapter_dir=[adapter_root],
        preload_adapter=["local:plain", "local:missing"],
    )  # fmt: skip
    with TestClient(create_app(settings, engine=engine)) as client:
        assert len(engine.loras) == 1  # loaded before any request; the missing one only logged
        rows = client.get("/v1/adapters").json()["data"]
        assert [(row["id"], row["pinned"]) for row in rows] == [("plain", True)]


@pytest.mark.parametrize("name", ["0123456789abcdef0123456789abcdef01234567", "a" * 40])
def test_a_local_adapter_named_like_a_commit_is_served(
    adapter_client: TestClient, adapter_root: Path, name: str
) -> None:
    write_adapter(adapter_root / name)
    answer = _chat(adapter_client, name)
    assert answer["status"] == 200, answer
    assert answer["model"] == name


@pytest.mark.parametrize("name", ["plain\n", "plain\r\n", "plain\t", "pla\x00in", " plain"])
def test_names_that_cannot_exist_are_404_before_any_io(adapter_client: TestClient, name: str) -> None:
    answer = _chat(adapter_client, name)
    assert answer["status"] == 404, answer
    assert answer["error"]["code"] == "model_not_found"


def test_a_missing_local_adapter_named_like_a_commit_is_404(adapter_client: TestClient) -> None:
    answer = _chat(adapter_client, "0123456789abcdef0123456789abcdef01234567")
    assert answer["status"] == 404, answer


def test_a_hub_name_with_a_newline_is_404_not_blamed_on_the_hub(adapter_client: TestClient) -> None:
    response = adapter_client.post(CHAT, json={"model": "acme/good-1\n", "messages": USER, "max_tokens": 1})
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "model_not_found"


def test_the_cache_folder_deleted_under_a_running_server_is_rebuilt(
    adapter_client: TestClient, engine: FakeEngine, tmp_path: Path
) -> None:
    assert _chat(adapter_client, "plain")["status"] == 200
    shutil.rmtree(tmp_path / "cache")  # an operator's rm -rf, a tmpfs cleaner
    again = _chat(adapter_client, "plain")  # formerly cached
    assert again["status"] == 200, again
    assert _chat(adapter_client, "templated")["status"] == 200  # never cached
    lora = engine.calls[-2][3]
    assert lora is not None and Path(lora.path).is_dir()  # the engine loads from files that exist
    shutil.rmtree(tmp_path / "cache")
    assert _chat(adapter_client, "templated")["status"] == 200
    assert adapter_client.get("/v1/adapters").status_code == 200
