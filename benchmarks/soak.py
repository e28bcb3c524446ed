"""Soak: many streaming clients over the base and 8 adapters, a cache that holds 4, some clients leaving early.

Starts `loraserve serve` (the embedded model) with 8 local peft adapters and an
adapter cache budget that holds about 4 of them, then for --duration seconds
keeps --clients concurrent clients busy on loopback: each picks the base or an
adapter by Zipf popularity (alpha 1), streams a short chat answer, and one in
ten leaves after two chunks. It reports responses by status, streams that did
not end with [DONE] (not counting the clients that left), peak disk use of the
adapter cache against its budget, and the server's RSS (all its processes) and
open files at start and end. Prints the figures and saves them as JSON under
benchmarks/results/.

    .venv/bin/python benchmarks/soak.py [--duration 300] [--clients 64]

Goal: no unexpected status (a 503 or 507 with Retry-After under pressure is a
retryable answer, reported apart), every stream well-formed, disk never above
budget, RSS and file descriptors flat. tests/e2e/test_soak.py runs 30 s of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _process_group as process_group  # noqa: E402
from benchmarks import _results  # noqa: E402
from benchmarks.compare.servers import disk_bytes  # noqa: E402
from benchmarks.compare.workload import zipf_weights  # noqa: E402
from tests.support.adapters import make_lora_adapter  # noqa: E402
from tests.support.server import free_port, wait_healthy  # noqa: E402

from loraserve.demo import embedded_model_dir  # noqa: E402

ADAPTERS = [f"soak-{i}" for i in range(8)]
RETRYABLE = {429, 503, 507}


@dataclass
class SoakReport:
    duration_s: float
    clients: int
    requests: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    retryable_without_retry_after: int = 0
    streams_without_done: int = 0
    streams_with_error_event: int = 0
    clients_left_early: int = 0
    peak_cache_bytes: int = 0
    cache_budget_bytes: int = 0
    rss_start_mb: float = 0.0
    rss_end_mb: float = 0.0
    fds_start: int = 0
    fds_end: int = 0

    @property
    def unexpected(self) -> int:
        """Responses a client could not have handled: not 2xx, and not a retryable status with Retry-After."""
        bad = sum(count for status, count in self.statuses.items() if status >= 300 and status not in RETRYABLE)
        return bad + self.retryable_without_retry_after + self.streams_without_done + self.streams_with_error_event

    def as_dict(self) -> dict[str, object]:
        figures = asdict(self)
        figures["statuses"] = {str(k): v for k, v in sorted(self.statuses.items())}
        figures["unexpected"] = self.unexpected
        return figures


def make_adapters(folder: Path, model_dir: Path) -> int:
    """Write the 8 adapters; return the size of one (they are all the same size)."""
    for seed, name in enumerate(ADAPTERS, start=1):
        make_lora_adapter(model_dir, folder / name, seed=seed)
    return sum(p.stat().st_size for p in (folder / ADAPTERS[0]).iterdir())


def _open_files(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _not_budgeted(name: str) -> bool:
    """The cache's lock files and entry metadata, which its budget does not count."""
    return name.endswith(".lock") or name == ".loraserve-entry.json"


def _cache_bytes(cache: Path) -> int:
    """Adapter bytes on disk, downloads in progress included (a walk that tolerates the server's renames)."""
    return disk_bytes(cache, skip=_not_budgeted)


async def _client(url: str, report: SoakReport, stop_at: float, rng: random.Random, max_tokens: int) -> None:
    models = ["", *ADAPTERS]
    weights = zipf_weights(len(models))
    async with httpx.AsyncClient(base_url=url, timeout=120) as http:
        while time.monotonic() < stop_at:
            model = rng.choices(models, weights)[0]
            leave_early = rng.random() < 0.1
            body = {
                "model": model,
                "adapter_source": "local",
                "messages": [{"role": "user", "content": f"Say something about the number {rng.randint(1, 99)}."}],
                "max_tokens": max_tokens,
                "stream": True,
            }
            report.requests += 1
            try:
                async with http.stream("POST", "/v1/chat/completions", json=body) as response:
                    report.statuses[response.status_code] += 1
                    if response.status_code != 200:
                        if response.status_code in RETRYABLE and "retry-after" not in response.headers:
                            report.retryable_without_retry_after += 1
                        await response.aread()
                        await asyncio.sleep(float(response.headers.get("retry-after", "1")))
                        continue
                    events: list[str] = []
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            events.append(line[len("data: ") :])
                            if leave_early and len(events) >= 2:
                                break
                    if leave_early and events[-1:] != ["[DONE]"]:
                        report.clients_left_early += 1
                        continue
                    if events[-1:] != ["[DONE]"]:
                        report.streams_without_done += 1
                    elif any(event.startswith('{"error"') for event in events):
                        report.streams_with_error_event += 1
            except httpx.HTTPError:
                report.statuses[-1] += 1  # no HTTP answer at all: counted as unexpected


async def _sample(cache: Path, report: SoakReport, stop_at: float) -> None:
    while time.monotonic() < stop_at:
        report.peak_cache_bytes = max(report.peak_cache_bytes, _cache_bytes(cache))
        await asyncio.sleep(0.25)


async def drive(url: str, cache: Path, report: SoakReport, max_tokens: int = 16, seed: int = 0) -> None:
    """Run the clients against a server already up at ``url`` until report.duration_s has passed."""
    stop_at = time.monotonic() + report.duration_s
    rngs = [random.Random(seed * 1000 + i) for i in range(report.clients)]
    await asyncio.gather(
        _sample(cache, report, stop_at), *(_client(url, report, stop_at, rng, max_tokens) for rng in rngs)
    )


def server_command(port: int, adapters: Path, cache: Path, budget: int) -> list[str]:
    return [
        sys.executable, "-m", "loraserve", "serve", "--port", str(port),
        "--adapter-dir", str(adapters), "--adapter-cache-dir", str(cache), "--adapter-cache-size", str(budget),
        "--max-loras", "4", "--max-cpu-loras", "8",
    ]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=300)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraserve-soak."))
    adapters, cache = work / "adapters", work / "cache"
    one = make_adapters(adapters, embedded_model_dir(Path.home() / ".cache" / "loraserve"))
    budget = int(4.5 * one)
    port = free_port()
    log = work / "server.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            server_command(port, adapters, cache, budget), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, 600, log)
        report = SoakReport(duration_s=args.duration, clients=args.clients, cache_budget_bytes=budget)
        report.rss_start_mb, report.fds_start = process_group.rss_mb(process.pid), _open_files(process.pid)
        asyncio.run(drive(url, cache, report, args.max_tokens))
        time.sleep(2)  # let aborted requests settle before the end figures
        report.rss_end_mb, report.fds_end = process_group.rss_mb(process.pid), _open_files(process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=120)
    figures = report.as_dict()
    print(json.dumps(figures, indent=2))
    print(_results.save("soak", figures))


if __name__ == "__main__":
    main()
