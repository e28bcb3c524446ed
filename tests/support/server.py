"""Starting a server under test: a free loopback port, and waiting until /health answers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float, log: Path | None = None) -> None:
    """Return once GET {url}/health is 200; raise if the process exits or time runs out (with the log's tail)."""

    def tail() -> str:
        return f":\n{log.read_text()[-5000:]}" if log is not None and log.exists() else ""

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}{tail()}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server not healthy after {timeout_s:.0f} s{tail()}")


def wait_until(condition: Callable[[], bool], timeout: float, interval: float) -> None:
    """Return once ``condition()`` holds; fail the test when ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)
