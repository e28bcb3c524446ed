"""A client that goes away must abort its engine request."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

from starlette.requests import ClientDisconnect

from loraserve.base_model import BaseModel
from loraserve.generation import Generator
from loraserve.models import ModelCatalog
from loraserve.protocol.requests import ChatCompletionRequest, CompletionRequest
from loraserve.routes.answer import EventStream
from loraserve.routes.disconnect import ClientDisconnected, cancel_on_disconnect
from loraserve.routes.openai import _chat_events, chat_request
from loraserve.templates import ChatFormat, load_tokenizer
from tests.unit.conftest import FakeEngine


def _generator(engine: FakeEngine, model_dir: Path) -> Generator:
    catalog = ModelCatalog(
        BaseModel(model_dir, "tiny", "tiny"), engine.max_model_len, ChatFormat(load_tokenizer(model_dir)), None
    )
    return Generator(engine, catalog)


async def test_closing_a_stream_early_aborts_the_engine_request(model_dir: Path) -> None:
    engine = FakeEngine(delay=0.01)
    generator = _generator(engine, model_dir)
    body = ChatCompletionRequest(model="", messages=[{"role": "user", "content": "hello"}], max_tokens=50, stream=True)
    async with generator.prepare(chat_request(body)) as prepared:
        deltas = await generator.open_stream(prepared)
        events = _chat_events(prepared, deltas, 0, False)
        await events.__anext__()
        await events.__anext__()
        assert engine.running == {prepared.request_id}
        await deltas.aclose()  # what the response does when its client disconnects
        assert engine.aborted == [prepared.request_id]
        assert engine.running == set()


class _GoneRequest:
    headers: dict[str, str] = {}
    scope: dict[str, object] = {}

    async def is_disconnected(self) -> bool:
        return True


async def test_non_streaming_request_is_aborted_when_the_client_leaves(model_dir: Path) -> None:
    engine = FakeEngine(delay=0.05)
    generator = _generator(engine, model_dir)
    body = ChatCompletionRequest(model="", messages=[{"role": "user", "content": "hello"}], max_tokens=50)
    async with generator.prepare(chat_request(body)) as prepared:
        try:
            await cancel_on_disconnect(_GoneRequest(), generator.complete(prepared))  # type: ignore[arg-type]
        except ClientDisconnected:
            pass
        else:
            raise AssertionError("expected ClientDisconnected")
    await asyncio.sleep(0)
    assert engine.aborted == [prepared.request_id]


async def test_a_stream_whose_body_never_starts_still_aborts_and_releases(model_dir: Path) -> None:

    engine = FakeEngine(delay=0.01)
    generator = _generator(engine, model_dir)
    body = ChatCompletionRequest(model="", messages=[{"role": "user", "content": "hello"}], max_tokens=50, stream=True)
    held = AsyncExitStack()
    prepared = await held.enter_async_context(generator.prepare(chat_request(body)))
    deltas = await generator.open_stream(prepared)
    held.push_async_callback(deltas.aclose)
    released: list[bool] = []
    held.callback(lambda: released.append(True))  # stands for the adapter lease, released last

    async def receive() -> dict:
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        raise OSError("client went away before the response started")

    response = EventStream(_chat_events(prepared, deltas, 0, False), held)
    try:
        await response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, send)  # type: ignore[arg-type]
    except (OSError, ClientDisconnect):
        pass
    assert engine.aborted == [prepared.request_id]
    assert released


async def test_a_stream_whose_client_leaves_before_the_first_token_is_aborted(model_dir: Path) -> None:
    from loraserve.config import Settings
    from loraserve.metrics import ServerMetrics
    from loraserve.routes.openai import completions
    from loraserve.services import Services

    engine = FakeEngine(delay=5.0)  # a long prefill: the first token is seconds away
    generator = _generator(engine, model_dir)
    services = Services(Settings(model=str(model_dir)), engine, generator._catalog, generator, ServerMetrics([]))
    body = CompletionRequest(model="", prompt="hello", max_tokens=5, stream=True)
    response = await asyncio.wait_for(completions(body, _GoneRequest(), services), 3)  # type: ignore[arg-type]
    assert response.status_code == 499
    assert len(engine.aborted) == 1 and engine.running == set()
