"""One real server per test run: loraserve + vLLM on this machine + the embedded model."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

STARTUP_TIMEOUT_S = 420


@dataclass(frozen=True)
class RunningServer:
    url: str
    log: Path
    model_dir: Path

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=120)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log.read_text()[-5000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"server not healthy after {STARTUP_TIMEOUT_S}s:\n{log.read_text()[-5000:]}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    # fp32 keeps greedy decoding deterministic; small sizes keep the test machine free.
    command = [
        sys.executable, "-m", "loraserve", "serve", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32",
    ]  # fmt: skip
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(url, process, log)
        info = httpx.get(f"{url}/info").json()
        cache = Path(os.environ.get("LORASERVE_CACHE_DIR", Path.home() / ".cache" / "loraserve"))
        yield RunningServer(url, log, cache / "models" / "SmolLM2-135M-Instruct")
        assert info["model_id"]
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
