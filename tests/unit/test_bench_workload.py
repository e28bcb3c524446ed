"""The benchmark's streaming client against a small local SSE server: what it times, counts and sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web
import pytest
from benchmarks.compare.workload import BASE, Client, Request


class ChatServer:
    """Answers chat completions the way an OpenAI server streams them; remembers what it was sent."""

    def __init__(self, hold_until: int = 0) -> None:
        self.bodies: list[dict[str, Any]] = []
        self._hold_until = hold_until  # answer nothing until this many requests are in flight
        self._all_in = asyncio.Event()

    async def chat(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if len(self.bodies) >= self._hold_until:
            self._all_in.set()
        await asyncio.wait_for(self._all_in.wait(), timeout=5)
        if body["model"] == "refused":
            return aiohttp.web.json_response({"error": {"message": "no"}}, status=404)
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        chunks: list[dict[str, Any]] = [
            {"choices": [{"index": 0, "delta": {"role": "assistant"}}]},  # vLLM's first chunk carries no text
            {"choices": [{"index": 0, "delta": {"content": "Hel"}}]},
            {"choices": [{"index": 0, "delta": {"content": "lo"}}]},
            {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
        ]
        for chunk in chunks:
            await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            await asyncio.sleep(0.01)
        await response.write(b"data: [DONE]\n\n")
        return response

    async def unload(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self.bodies.append(await request.json())
        return aiohttp.web.json_response({}, status=200)


async def _serve(server: ChatServer) -> AsyncIterator[str]:
    app = aiohttp.web.Application()
    app.router.add_post("/v1/chat/completions", server.chat)
    app.router.add_post("/v1/unload_lora_adapter", server.unload)
    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def chat_server() -> AsyncIterator[tuple[str, ChatServer]]:
    server = ChatServer()
    async for url in _serve(server):
        yield url, server


async def test_one_times_the_first_content_token_and_reads_usage(chat_server: tuple[str, ChatServer]) -> None:
    url, server = chat_server
    async with Client(url, "served-base") as client:
        timed = await client.one(Request(BASE, "Hi there", 2))
    assert timed.status == 200
    assert timed.tokens == 2 and timed.prompt_tokens == 5
    assert timed.first is not None and timed.done is not None
    # The role-only chunk is not the first token: the first content came one chunk (10 ms) later.
    assert timed.sent < timed.first <= timed.done
    assert timed.ttft is not None and timed.ttft >= 0.01
    sent = server.bodies[0]
    assert sent["model"] == "served-base"  # BASE is spelled as the server names its base model
    assert sent["messages"] == [{"role": "user", "content": "Hi there"}]
    assert sent["max_tokens"] == 2 and sent["stream"] is True and sent["ignore_eos"] is True


async def test_an_error_status_is_recorded_not_raised(chat_server: tuple[str, ChatServer]) -> None:
    url, _ = chat_server
    async with Client(url, "served-base") as client:
        timed = await client.one(Request("refused", "Hi", 2))
        assert timed.status == 404 and timed.tokens == 0 and timed.first is None
        assert await client.post("/v1/unload_lora_adapter", {"lora_name": "x"}) == 200


async def test_an_unreachable_server_counts_as_failed() -> None:
    async with Client("http://127.0.0.1:9", "base", timeout_s=5) as client:
        timed = await client.one(Request(BASE, "Hi", 2))
    assert timed.status == -1 and timed.done is None


async def test_all_at_once_has_every_request_in_flight_together() -> None:
    # The server answers only when all 120 are in: a client capped at aiohttp's default 100 connections times out.
    server = ChatServer(hold_until=120)
    async for url in _serve(server):
        async with Client(url, "base") as client:
            results = await client.all_at_once([Request(f"m{i}", f"Prompt {i}.", 2) for i in range(120)])
    assert [r.status for r in results] == [200] * 120
    assert [r.model for r in results] == [f"m{i}" for i in range(120)]  # in the order asked
    assert sorted(body["model"] for body in server.bodies) == sorted(f"m{i}" for i in range(120))


async def test_closed_loop_keeps_the_concurrency_and_the_order(chat_server: tuple[str, ChatServer]) -> None:
    url, server = chat_server
    async with Client(url, "base") as client:
        results = await client.closed_loop([Request(f"m{i}", "Hi", 2) for i in range(6)], 2)
    assert len(results) == 6 and all(r.status == 200 for r in results)
    assert [body["model"] for body in server.bodies[:2]] == ["m0", "m1"]


async def test_the_client_must_be_entered() -> None:
    with pytest.raises(RuntimeError, match="async with"):
        await Client("http://127.0.0.1:9", "base").one(Request(BASE, "Hi", 2))
