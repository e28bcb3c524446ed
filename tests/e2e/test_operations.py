"""Operations end to end on a server of their own: /metrics, the request log, vLLM's load/unload API,
the API key, the concurrency limit, and the cache commands beside the running server.

This server's counters move only with this module's requests, so they are checked to the unit.
Its adapter cache holds one adapter: every second adapter evicts the first.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from loraserve.errors import LORAX_PATHS
from tests.e2e.conftest import RunningServer, _serve, _World
from tests.support.endpoint_picker import EPP_METRICS, LORA_INFO_LABELS
from tests.support.metrics import names, samples, value
from tests.support.server import wait_until

KEY = "sk-e2e-operations"
AUTH = {"Authorization": f"Bearer {KEY}"}
MAX_CONCURRENT = 3
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def ops(world: _World) -> Iterator[RunningServer]:
    one_adapter = sum(p.stat().st_size for p in world.adapters["acme/voice"].iterdir())
    extra = [
        "--api-key", KEY, "--metrics-without-key", "--max-concurrent-requests", str(MAX_CONCURRENT),
        "--adapter-cache-size", str(int(1.5 * one_adapter)),
        # The suite's two other servers are up, each with 30% of RAM: this one takes 12%.
        "--gpu-memory-utilization", "0.12",
    ]  # fmt: skip
    with _serve(world, "ops", extra) as running:
        yield running


def _client(server: RunningServer, retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.v1, api_key=KEY, max_retries=retries, timeout=120)


def _page(server: RunningServer) -> str:
    response = httpx.get(f"{server.url}/metrics", timeout=30)  # open: --metrics-without-key
    assert response.status_code == 200
    return response.text


def _complete(server: RunningServer, model: str, max_tokens: int = 4) -> openai.types.Completion:
    return _client(server).completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0)


def _cache_cli(server: RunningServer, *args: str) -> subprocess.CompletedProcess[str]:
    cache = server.log.parent / "ops-adapter-cache"
    command = [sys.executable, "-m", "loraserve", "adapters", *args, "--adapter-cache-dir", str(cache)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def _running_adapters(page: str) -> set[str]:
    """The adapters vllm:lora_requests_info reports running now: its value is a timestamp, and as the
    endpoint picker does, the label set with the latest one is the current state."""
    latest: tuple[float, dict[str, str]] = (-1.0, {})
    for (name, labels), stamp in samples(page).items():
        if name == "vllm:lora_requests_info" and stamp > latest[0]:
            latest = (stamp, dict(labels))
    info = latest[1]
    assert set(LORA_INFO_LABELS) <= set(info), info
    return {n for n in info["running_lora_adapters"].split(",") if n}


def _moved_sum(before: str, after: str, name: str) -> float:
    """How much a counter moved, summed over all its label sets."""
    return sum(v - value(before, n, **dict(labels)) for (n, labels), v in samples(after).items() if n == name)


def _wait_for(condition: Callable[[], bool], timeout: float = 60) -> None:
    wait_until(condition, timeout=timeout, interval=0.2)


def test_counters_move_by_exactly_what_the_requests_did(ops: RunningServer) -> None:
    before = _page(ops)
    answers = [_complete(ops, ""), _complete(ops, "acme/voice"), _complete(ops, "acme/voice")]
    with pytest.raises(openai.NotFoundError):
        _complete(ops, "acme/no-such-adapter")
    after = _page(ops)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    base = "HuggingFaceTB/SmolLM2-135M-Instruct"
    endpoint = "/v1/completions"
    assert moved("loraserve_requests_total", model=base, endpoint=endpoint, status="200") == 1
    assert moved("loraserve_requests_total", model="acme/voice", endpoint=endpoint, status="200") == 2
    assert moved("loraserve_requests_total", model="other", endpoint=endpoint, status="404") == 1
    assert not any("no-such-adapter" in str(labels) for _, labels in samples(after))
    usage = [a.usage for a in answers]
    assert all(u is not None for u in usage)
    assert moved("loraserve_completion_tokens_total", model="acme/voice") == sum(
        u.completion_tokens for u in usage[1:] if u
    )
    assert moved("loraserve_prompt_tokens_total", model=base) == usage[0].prompt_tokens  # type: ignore[union-attr]
    assert moved("loraserve_time_to_first_token_seconds_count", model="acme/voice") == 2
    # The cold adapter: one miss, one download of its files, one load into the engine; then a hit.
    assert moved("loraserve_adapter_cache_misses_total") == 1
    assert moved("loraserve_adapter_cache_hits_total") == 1
    assert moved("loraserve_adapter_downloads_total") == 1
    assert moved("loraserve_adapter_engine_loads_total") == 1
    fetched = sum(p.stat().st_size for p in ops.adapters["acme/voice"].iterdir() if p.name != "README.md")
    assert moved("loraserve_adapter_download_bytes_total") == fetched
    # vLLM's own series are on the same page and counted the same three answers.
    assert _moved_sum(before, after, "vllm:request_success_total") == 3
    assert _moved_sum(before, after, "vllm:generation_tokens_total") == sum(u.completion_tokens for u in usage if u)


def test_a_second_adapter_evicts_the_first_from_disk_and_engine(ops: RunningServer) -> None:
    _complete(ops, "acme/voice")
    before = _page(ops)
    assert _complete(ops, "acme/concurrent").choices[0].text
    after = _page(ops)
    for where in ("disk", "engine"):
        assert (
            value(after, "loraserve_adapter_evictions_total", where=where)
            - value(before, "loraserve_adapter_evictions_total", where=where)
            == 1
        )
    assert value(after, "loraserve_adapters", state="disk") == 1
    assert value(after, "loraserve_adapter_cache_used_bytes") <= value(after, "loraserve_adapter_cache_budget_bytes")


def test_what_the_endpoint_picker_reads_is_exported_with_client_names(ops: RunningServer) -> None:
    assert set(EPP_METRICS) <= names(_page(ops))

    def long_request() -> None:
        _client(ops).completions.create(
            model="acme/concurrent", prompt=PROMPT, max_tokens=48, temperature=0, extra_body={"ignore_eos": True}
        )

    running = threading.Thread(target=long_request)
    running.start()
    try:
        _wait_for(lambda: "acme/concurrent" in _running_adapters(_page(ops)))
    finally:
        running.join()
    # The name clients send, as LoRA-aware routers match it; never loraserve's internal one.
    history = " ".join(line for line in _page(ops).splitlines() if line.startswith("vllm:lora_requests_info"))
    assert history and "@" not in history and "#" not in history, history


def test_each_request_is_one_log_line_with_its_id(ops: RunningServer) -> None:
    response = httpx.post(
        f"{ops.v1}/completions",
        json={"model": "acme/concurrent", "prompt": PROMPT, "max_tokens": 3, "ignore_eos": True},
        headers={**AUTH, "X-Request-Id": "e2e-trace-7"},
        timeout=120,
    )
    assert response.status_code == 200 and response.headers["x-request-id"] == "e2e-trace-7"
    _wait_for(lambda: "id=e2e-trace-7" in ops.log.read_text(errors="replace"), timeout=10)
    (line,) = [ln for ln in ops.log.read_text(errors="replace").splitlines() if "id=e2e-trace-7" in ln]
    assert "status=200" in line and "model=acme/concurrent" in line and "completion_tokens=3" in line
    assert KEY not in ops.log.read_text(errors="replace")  # the key is never logged


def test_every_route_but_health_and_metrics_needs_the_key(ops: RunningServer) -> None:
    spec = httpx.get(f"{ops.url}/openapi.json", headers=AUTH, timeout=30).json()
    routes = [(method.upper(), path) for path, item in spec["paths"].items() for method in item]
    assert ("POST", "/v1/load_lora_adapter") in routes and ("GET", "/v1/adapters") in routes
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Bearer {KEY}x"}):
            response = httpx.request(method, f"{ops.url}{path}", json={}, headers=headers, timeout=30)
            if path in ("/health", "/metrics"):
                assert response.status_code == 200, (method, path)
                continue
            assert response.status_code == 401, (method, path, headers)
            if path in LORAX_PATHS:  # LoRAX's routes answer in LoRAX's shape, which lorax-client reads
                assert response.json()["error_type"] == "authentication"
            else:
                assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=ops.v1, api_key="sk-wrong", max_retries=0).models.list()
    assert _client(ops).models.list().data  # and with the key, the SDK works


def test_a_burst_beyond_the_limit_gets_429s_that_the_sdk_retries(ops: RunningServer) -> None:
    def raw(_: int) -> httpx.Response:
        body = {"model": "", "prompt": PROMPT, "max_tokens": 24, "ignore_eos": True}
        return httpx.post(f"{ops.v1}/completions", json=body, headers=AUTH, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3 * MAX_CONCURRENT) as pool:
        responses = list(pool.map(raw, range(3 * MAX_CONCURRENT)))
    statuses = [r.status_code for r in responses]
    refused = [r for r in responses if r.status_code == 429]
    assert set(statuses) <= {200, 429} and statuses.count(200) >= MAX_CONCURRENT and 429 in statuses, statuses
    assert refused and all(r.headers["retry-after"] == "1" for r in refused)
    assert refused[0].json()["error"]["code"] == "rate_limit_exceeded"

    def sdk(_: int) -> str:  # OpenAI's SDK waits Retry-After and tries again
        return _client(ops, retries=8).completions.create(model="", prompt=PROMPT, max_tokens=8).choices[0].text

    with concurrent.futures.ThreadPoolExecutor(2 * MAX_CONCURRENT) as pool:
        assert all(pool.map(sdk, range(2 * MAX_CONCURRENT)))


def test_load_and_unload_with_a_request_in_flight(ops: RunningServer) -> None:
    direct = _complete(ops, "acme/voice", max_tokens=8).choices[0].text
    load = httpx.post(
        f"{ops.v1}/load_lora_adapter", json={"lora_name": "voice", "lora_path": "acme/voice"}, headers=AUTH
    )
    assert load.status_code == 200 and load.text == "Success: LoRA adapter 'voice' added successfully."
    again = httpx.post(
        f"{ops.v1}/load_lora_adapter", json={"lora_name": "voice", "lora_path": "acme/voice"}, headers=AUTH
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert _complete(ops, "voice", max_tokens=8).choices[0].text == direct
    before = _page(ops)
    streamed: list[str] = []

    def in_flight() -> None:
        stream = _client(ops).completions.create(
            model="voice", prompt=PROMPT, max_tokens=40, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
        streamed.append("".join(chunk.choices[0].text for chunk in stream if chunk.choices))

    running = threading.Thread(target=in_flight)
    running.start()
    _wait_for(lambda: "voice" in _running_adapters(_page(ops)))
    unload = httpx.post(f"{ops.v1}/unload_lora_adapter", json={"lora_name": "voice"}, headers=AUTH)
    assert unload.status_code == 200 and unload.text == "Success: LoRA adapter 'voice' removed successfully."
    with pytest.raises(openai.NotFoundError):
        _complete(ops, "voice")  # at once
    running.join()
    assert len(streamed) == 1 and streamed[0].startswith(direct)  # the running request finished, unharmed

    def left_the_engine() -> bool:
        page = _page(ops)
        return value(page, "loraserve_adapter_evictions_total", where="engine") > value(
            before, "loraserve_adapter_evictions_total", where="engine"
        )

    _wait_for(left_the_engine)
    missing = httpx.post(f"{ops.v1}/unload_lora_adapter", json={"lora_name": "voice"}, headers=AUTH)
    assert missing.status_code == 404


def test_the_cache_commands_work_beside_the_running_server(ops: RunningServer) -> None:
    assert _complete(ops, "acme/concurrent").choices[0].text  # loaded in the engine: marked in use
    listing = _cache_cli(ops, "list", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = {row["ref"]: row for row in json.loads(listing.stdout)["adapters"]}
    assert rows["acme/concurrent"]["in_use_by"], rows
    refused = _cache_cli(ops, "rm", "acme/concurrent")
    assert refused.returncode == 1 and "unload" in refused.stderr.lower()
    unload = httpx.post(f"{ops.v1}/unload_lora_adapter", json={"lora_name": "acme/concurrent"}, headers=AUTH)
    assert unload.status_code == 200

    def removable() -> bool:
        return _cache_cli(ops, "rm", "acme/concurrent").returncode == 0

    _wait_for(removable)
    assert "acme/concurrent" not in _cache_cli(ops, "list").stdout
    before = _page(ops)
    assert _complete(ops, "acme/concurrent").choices[0].text  # fetched again, served
    assert (
        value(_page(ops), "loraserve_adapter_downloads_total") - value(before, "loraserve_adapter_downloads_total") == 1
    )
    assert httpx.get(f"{ops.url}/health", timeout=30).status_code == 200
