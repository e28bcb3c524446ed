"""A graceful stop: new requests are 503 at once; running ones finish until the deadline, then end cleanly."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from loraserve.app import create_app
from loraserve.config import Settings
from tests.unit.conftest import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture
def stopping_client(model_dir: Path, tmp_path: Path, engine: FakeEngine) -> Iterator[TestClient]:
    settings = Settings(model=str(model_dir), served_model_name="tiny", cache_dir=tmp_path / "cache",
                        shutdown_timeout=0.4)  # fmt: skip
    with TestClient(create_app(settings, engine=engine)) as client:
        yield client


def _begin_drain_soon(client: TestClient, after_s: float = 0.2) -> None:
    threading.Timer(after_s, client.app.state.drain.begin).start()  # as the signal handler does


def test_new_requests_are_503_while_draining(stopping_client: TestClient, engine: FakeEngine) -> None:
    stopping_client.app.state.drain.begin()
    response = stopping_client.post(COMPLETIONS, json={"model": "", "prompt": "hello", "max_tokens": 1})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert int(response.headers["retry-after"]) > 0
    assert engine.calls == []


def test_a_stream_still_running_at_the_deadline_ends_with_an_error_and_done(
    stopping_client: TestClient, engine: FakeEngine
) -> None:
    engine.delay = 0.05  # 50 tokens take 2.5 s; the deadline comes 0.6 s after the start
    _begin_drain_soon(stopping_client)
    body = {"model": "", "prompt": "hello", "max_tokens": 50, "stream": True}
    with stopping_client.stream("POST", COMPLETIONS, json=body) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = json.loads(events[-2])["error"]
    assert error["code"] == "server_shutting_down"
    assert 1 < len(events) - 2 < 50  # some tokens came before the deadline, not all
    assert engine.aborted and not engine.running  # the engine request was ended, not left running


def test_a_plain_request_still_running_at_the_deadline_is_503(stopping_client: TestClient, engine: FakeEngine) -> None:
    engine.delay = 0.05
    _begin_drain_soon(stopping_client)
    response = stopping_client.post(CHAT, json={"model": "", "messages": [{"role": "user", "content": "hi"}],
                                                "max_tokens": 50})  # fmt: skip
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "server_shutting_down"
    assert not engine.running


def test_requests_that_finish_before_the_deadline_complete(stopping_client: TestClient, engine: FakeEngine) -> None:
    engine.delay = 0.05  # 5 tokens: 0.25 s, well inside the 0.4 s after the drain begins
    _begin_drain_soon(stopping_client, after_s=0.05)
    body = {"model": "", "prompt": "hello", "max_tokens": 5, "stream": True}
    with stopping_client.stream("POST", COMPLETIONS, json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


async def test_a_request_cancelled_mid_generation_aborts_its_engine_request(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import asyncio

    from loraserve.base_model import BaseModel
    from loraserve.generation import Generator
    from loraserve.models import ModelCatalog
    from loraserve.protocol.requests import CompletionRequest
    from loraserve.routes.openai import completion_request
    from loraserve.shutdown import Drain
    from loraserve.templates import ChatFormat, load_tokenizer

    engine = FakeEngine(delay=0.05)
    catalog = ModelCatalog(BaseModel(model_dir, "tiny", "tiny"), 64, ChatFormat(load_tokenizer(model_dir)), None)
    drain = Drain(30)
    drain.attach(asyncio.get_running_loop())
    generator = Generator(engine, catalog, drain=drain)
    body = CompletionRequest(model="", prompt="hello", max_tokens=50)
    async with generator.prepare(completion_request(body)) as prepared:
        task = asyncio.create_task(generator.complete(prepared))
        await asyncio.sleep(0.2)
        task.cancel()  # the client left (cancel_on_disconnect)
        results = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError), results
    assert engine.aborted == [f"{prepared.request_id}-0"] and engine.running == set()
    assert "already running" not in caplog.text
