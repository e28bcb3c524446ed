"""The work both servers get: a seeded list of chat requests, and a streaming client that times each one.

Everything here is plain data plus one aiohttp client, so the same requests (prompt, model, length) go to
loraserve, to `vllm serve` and — rendered by the chat template — to the offline engine.

The client shares the machine's two cores with the server under test, so it is kept cheap: aiohttp
parses HTTP in C (httpx's pure-Python parsing cost about as much CPU per request as the server's own
API process, and a burst of 32 reached the server over ~100 ms instead of ~10 ms), bodies are encoded
before the clock starts, and a streamed line is parsed only until it has told what the timing needs.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import aiohttp

TOPICS = ("a lighthouse", "the sea", "a mountain", "a city at night", "a robot", "a garden", "a train", "winter")
BASE = ""  # how a request names the base model before a server maps it to its served name


def zipf_weights(count: int, alpha: float = 1.0) -> list[float]:
    """Popularity of rank 1..count under Zipf's law: rank r is chosen with weight 1 / r**alpha."""
    return [1.0 / rank**alpha for rank in range(1, count + 1)]


@dataclass(frozen=True)
class Request:
    model: str  # BASE or an adapter's Hub id
    prompt: str
    max_tokens: int


def zipf_requests(models: Sequence[str], count: int, max_tokens: int, seed: int, alpha: float = 1.0) -> list[Request]:
    """``count`` requests over ``models`` (most popular first) by Zipf popularity; the same seed, the same list."""
    rng = random.Random(seed)
    picks = rng.choices(list(models), zipf_weights(len(models), alpha), k=count)
    return [Request(model, _prompt(i), max_tokens) for i, model in enumerate(picks)]


def on_models(requests: Sequence[Request], models: Sequence[str]) -> list[Request]:
    """The same prompts and lengths, sent round-robin to ``models`` instead (all base, or all adapters)."""
    return [Request(models[i % len(models)], r.prompt, r.max_tokens) for i, r in enumerate(requests)]


def _prompt(i: int) -> str:
    # Distinct prompts: prefix caching may share the template's preamble, never a whole prompt.
    return f"Request {i}: write a short story about {TOPICS[i % len(TOPICS)]}."


@dataclass
class Timed:
    """One request as the client saw it."""

    model: str
    status: int
    sent: float  # monotonic seconds
    first: float | None = None  # first content token
    done: float | None = None
    tokens: int = 0  # completion tokens, from the usage chunk
    prompt_tokens: int = 0  # from the usage chunk: shows both servers got the same prompts

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.first is not None and self.done is not None

    @property
    def ttft(self) -> float | None:
        return None if self.first is None else self.first - self.sent

    @property
    def itl(self) -> float | None:
        """Mean time between tokens after the first (servers may coalesce chunks; token counts do not lie)."""
        if self.first is None or self.done is None or self.tokens < 2:
            return None
        return (self.done - self.first) / (self.tokens - 1)


@dataclass
class BatchFigures:
    """What a batch of requests measured: throughput over the whole batch, latency percentiles over requests."""

    requests: int
    ok: int
    wall_s: float
    prompt_tokens: int
    output_tokens: int
    output_tok_s: float
    requests_s: float
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    itl_p50_s: float | None
    statuses: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0–100) by linear interpolation; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(timed: Sequence[Timed]) -> BatchFigures:
    ok = [t for t in timed if t.ok]
    start = min((t.sent for t in timed), default=0.0)
    end = max((t.done for t in ok if t.done is not None), default=start)
    wall = max(end - start, 1e-9)
    tokens = sum(t.tokens for t in ok)
    statuses: dict[str, int] = {}
    for t in timed:
        statuses[str(t.status)] = statuses.get(str(t.status), 0) + 1
    ttfts = [t.ttft for t in ok if t.ttft is not None]
    itls = [t.itl for t in ok if t.itl is not None]
    return BatchFigures(
        requests=len(timed),
        ok=len(ok),
        wall_s=wall,
        prompt_tokens=sum(t.prompt_tokens for t in ok),
        output_tokens=tokens,
        output_tok_s=tokens / wall,
        requests_s=len(ok) / wall,
        ttft_p50_s=percentile(ttfts, 50),
        ttft_p99_s=percentile(ttfts, 99),
        itl_p50_s=percentile(itls, 50),
        statuses=statuses,
    )


class Client:
    """Streams chat completions from one server; ``base_name`` is what that server calls its base model."""

    def __init__(self, url: str, base_name: str, timeout_s: float = 600) -> None:
        self._url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._http: aiohttp.ClientSession | None = None
        self._base_name = base_name

    async def __aenter__(self) -> Client:
        # limit=0: no cap on connections, so a burst of N requests is N requests in flight at once.
        self._http = aiohttp.ClientSession(timeout=self._timeout, connector=aiohttp.TCPConnector(limit=0))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None:
            raise RuntimeError("use the Client in an `async with` block")
        return self._http

    def _body(self, request: Request) -> bytes:
        return json.dumps(
            {
                "model": request.model or self._base_name,
                "messages": [{"role": "user", "content": request.prompt}],
                "max_tokens": request.max_tokens,
                "temperature": 0,
                "ignore_eos": True,  # every request costs exactly max_tokens on both servers
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()

    async def one(self, request: Request, body: bytes | None = None) -> Timed:
        body = body if body is not None else self._body(request)
        timed = Timed(request.model, 0, time.monotonic())
        try:
            async with self._session().post(
                f"{self._url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
            ) as response:
                timed.status = response.status
                if response.status != 200:
                    await response.read()
                    return timed
                async for raw in response.content:
                    _read_line(raw, timed)
            timed.done = time.monotonic()
        except (TimeoutError, aiohttp.ClientError):
            timed.status = -1
        return timed

    async def all_at_once(self, requests: Sequence[Request]) -> list[Timed]:
        bodies = [self._body(r) for r in requests]  # encoded before any is sent: the burst leaves at once
        return list(await asyncio.gather(*(self.one(r, body) for r, body in zip(requests, bodies, strict=True))))

    async def closed_loop(self, requests: Sequence[Request], concurrency: int) -> list[Timed]:
        """``concurrency`` clients, each sending its next request as soon as its last one finished, in order."""
        queue = list(reversed(requests))
        results: list[Timed] = []

        async def worker() -> None:
            while queue:
                results.append(await self.one(queue.pop()))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results

    async def post(self, path: str, body: dict[str, object]) -> int:
        async with self._session().post(f"{self._url}{path}", json=body) as response:
            await response.read()
            return response.status


def _read_line(raw: bytes, timed: Timed) -> None:
    """Note the first content token's time and the final usage from one streamed SSE line."""
    if not raw.startswith(b"data: ") or raw.startswith(b"data: [DONE]"):
        return
    # After the first token only the usage chunk matters: skip parsing the token chunks in between.
    if timed.first is not None and b'"completion_tokens"' not in raw:
        return
    chunk = json.loads(raw[len(b"data: ") :])
    choices = chunk.get("choices") or []
    if timed.first is None and choices and (choices[0].get("delta") or {}).get("content"):
        timed.first = time.monotonic()
    if chunk.get("usage"):
        timed.tokens = int(chunk["usage"].get("completion_tokens") or 0)
        timed.prompt_tokens = int(chunk["usage"].get("prompt_tokens") or 0)


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None
