"""vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter, with the fake engine and local adapters."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

from fastapi.testclient import TestClient

from loraserve.app import create_app
from loraserve.config import Settings
from tests.support.server import wait_until
from tests.unit.conftest import FakeEngine

LOAD, UNLOAD, CHAT = "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/v1/chat/completions"
USER = [{"role": "user", "content": "hello"}]


def _chat(client: TestClient, model: str, **extra: object) -> tuple[int, dict]:
    response = client.post(CHAT, json={"model": model, "messages": USER, "max_tokens": 2, **extra})
    return response.status_code, response.json()


def _adapter_row(client: TestClient, root_prefix: str) -> dict:
    return next(r for r in client.get("/v1/adapters").json()["data"] if r["root"].startswith(root_prefix))


def _wait_for(condition: Callable[[], bool]) -> None:
    wait_until(condition, timeout=5.0, interval=0.01)


def test_load_by_path_answers_as_vllm_and_serves_under_the_name(
    adapter_client: TestClient, adapter_root: Path, engine: FakeEngine
) -> None:
    response = adapter_client.post(LOAD, json={"lora_name": "mine", "lora_path": str(adapter_root / "plain")})
    assert response.status_code == 200
    assert response.text == "Success: LoRA adapter 'mine' added successfully."
    assert len(engine.loras) == 1  # loaded at once, before any request
    status, body = _chat(adapter_client, "mine")
    assert status == 200 and body["model"] == "mine"
    assert engine.calls[-1][3] is not None and engine.calls[-1][3].name == "mine"
    assert _adapter_row(adapter_client, "plain@")["pinned"] is True
    card = next(c for c in adapter_client.get("/v1/models").json()["data"] if c["id"] == "mine")
    assert card["parent"] == "tiny" and str(adapter_root) not in card["root"]


def test_a_taken_name_is_400_unless_in_place(adapter_client: TestClient, adapter_root: Path) -> None:
    first = {"lora_name": "mine", "lora_path": "local:plain"}
    assert adapter_client.post(LOAD, json=first).status_code == 200
    again = adapter_client.post(LOAD, json={**first, "lora_path": "local:templated"})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert _chat(adapter_client, "mine")[1]["usage"]["prompt_tokens"] != 4  # still the first one
    in_place = adapter_client.post(LOAD, json={**first, "lora_path": "local:templated", "load_inplace": True})
    assert in_place.status_code == 200
    assert _chat(adapter_client, "mine")[1]["usage"]["prompt_tokens"] == 4  # the templated adapter's prompt


def test_bad_loads_are_clear_errors(adapter_client: TestClient, tmp_path: Path) -> None:
    cases = [
        ({"lora_name": "tiny", "lora_path": "local:plain"}, 400, "lora_name", "conflicts with a served base model"),
        ({"lora_name": "x", "lora_path": str(tmp_path)}, 400, "lora_path", "inside an --adapter-dir"),
        ({"lora_name": "x", "lora_path": "relative/../plain"}, 404, "lora_path", "No adapter found"),
        ({"lora_name": "x", "lora_path": "~0"}, 400, "lora_path", "inside an --adapter-dir"),  # was a 500
        ({"lora_name": "x", "lora_path": "local:missing"}, 404, "lora_path", "No adapter found"),
        ({"lora_name": "x", "lora_path": "local:wrong"}, 400, "model", "gate_proj"),
        ({"lora_name": "", "lora_path": "local:plain"}, 400, "lora_name", "must be provided"),
        ({"lora_name": "x"}, 400, "lora_path", "lora_path"),
    ]
    for body, status, param, words in cases:
        response = adapter_client.post(LOAD, json=body)
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (status, param), (body, error)
        assert words in error["message"], (body, error)
    assert adapter_client.get("/health").status_code == 200


def test_unload_of_an_unknown_name_is_404(adapter_client: TestClient) -> None:
    response = adapter_client.post(UNLOAD, json={"lora_name": "never-loaded"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The lora adapter 'never-loaded' cannot be found."


def test_unload_refuses_new_requests_lets_running_ones_finish_then_leaves_the_engine(
    adapter_settings: Settings,
) -> None:
    engine = FakeEngine(delay=0.05)
    with TestClient(create_app(adapter_settings, engine=engine)) as client:
        assert client.post(LOAD, json={"lora_name": "mine", "lora_path": "local:plain"}).status_code == 200
        (lora_id,) = engine.loras
        streamed: list[str] = []
        running = threading.Thread(
            target=lambda: streamed.append(
                client.post(CHAT, json={"model": "mine", "messages": USER, "max_tokens": 30, "stream": True}).text
            )
        )
        running.start()
        _wait_for(lambda: bool(engine.running))
        response = client.post(UNLOAD, json={"lora_name": "mine"})
        assert response.status_code == 200
        assert response.text == "Success: LoRA adapter 'mine' removed successfully."
        status, body = _chat(client, "mine")
        assert status == 404 and body["error"]["code"] == "model_not_found"  # at once
        assert lora_id in engine.loras  # the running request still has it
        running.join()
        assert '"error"' not in streamed[0] and streamed[0].rstrip().endswith("[DONE]")
        _wait_for(lambda: lora_id not in engine.loras)  # then it leaves the engine
        assert _adapter_row(client, "plain@")["pinned"] is False
        inuse = adapter_settings.adapter_cache_path() / "inuse"
        _wait_for(lambda: not list(inuse.iterdir()))  # unmarked: `loraserve adapters rm` may remove it now
        assert client.post(UNLOAD, json={"lora_name": "mine"}).status_code == 404


def test_unload_of_an_on_demand_adapter_takes_it_out_of_the_engine(
    adapter_client: TestClient, engine: FakeEngine
) -> None:
    assert _chat(adapter_client, "plain", adapter_source="local")[0] == 200
    assert len(engine.loras) == 1
    assert adapter_client.post(UNLOAD, json={"lora_name": "plain"}).status_code == 200
    _wait_for(lambda: not engine.loras)
    # On demand means on demand: the next request loads it again, under a new LoRA id.
    assert _chat(adapter_client, "plain", adapter_source="local")[0] == 200
    assert len(engine.loras) == 1


def test_loads_obey_the_allow_list(adapter_settings: Settings, engine: FakeEngine) -> None:
    allowed = adapter_settings.model_copy(update={"allow_adapter": ["local:templated"]})
    with TestClient(create_app(allowed, engine=engine)) as client:
        refused = client.post(LOAD, json={"lora_name": "x", "lora_path": "local:plain"})
        assert refused.status_code == 404 and not engine.loras
        assert client.post(LOAD, json={"lora_name": "x", "lora_path": "local:templated"}).status_code == 200
