"""Every example runs against the test server, so none rots."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import RunningServer

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", sorted(p.name for p in EXAMPLES.glob("openai_*.py")))
def test_python_example_runs(server: RunningServer, script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        env={**os.environ, "LORASERVE_BASE_URL": server.v1, "LORASERVE_ADAPTER": "acme/voice"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Berlin" in result.stdout or "Paris" in result.stdout
    if script == "openai_adapter.py":
        assert "acme/voice: " in result.stdout


def test_curl_example_runs(server: RunningServer) -> None:
    result = subprocess.run(
        ["bash", str(EXAMPLES / "curl.sh")],
        env={**os.environ, "LORASERVE_BASE_URL": server.v1},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("data: [DONE]") == 2
    assert "Berlin" in result.stdout
