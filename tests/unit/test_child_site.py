"""Processes started below the server end when their parent dies (kill -9 of the server left vLLM's behind)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import loraserve.child_site

SITE = str(Path(loraserve.child_site.__file__).parent)
# A parent that starts a long-sleeping child and prints its pid.
PARENT = (
    "import subprocess, sys, time\n"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; print(\"ready\", flush=True); time.sleep(120)'])\n"
    "print(child.pid, flush=True)\n"
    "time.sleep(120)\n"
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers signal 0 until it is reaped; it holds no memory any more.
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split(")")[-1].split()[0] != "Z"


def _orphan_after_parent_killed(under_server: bool) -> int:
    env = {**os.environ, "PYTHONPATH": SITE}
    env.pop("LORASERVE_MAIN_PID", None)
    if under_server:
        env["LORASERVE_MAIN_PID"] = str(os.getpid())
    parent = subprocess.Popen([sys.executable, "-c", PARENT], env=env, stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    lines = {parent.stdout.readline().strip(), parent.stdout.readline().strip()}  # the pid, and "ready"
    child = int((lines - {"ready"}).pop())
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    return child


def test_a_child_ends_soon_after_its_parent_is_killed() -> None:
    child = _orphan_after_parent_killed(under_server=True)
    deadline = time.monotonic() + 30
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _alive(child)


def test_outside_a_server_nothing_watches_the_parent() -> None:
    child = _orphan_after_parent_killed(under_server=False)
    try:
        time.sleep(3)
        assert _alive(child)
    finally:
        os.kill(child, signal.SIGKILL)


@pytest.mark.parametrize("value", ["DEBUG", "ERROR"])
def test_vllms_log_level_applies_from_the_first_import(value: str) -> None:
    env = {**os.environ, "PYTHONPATH": SITE, "VLLM_LOGGING_LEVEL": value}
    code = "import logging; print(logging.getLevelName(logging.getLogger('vllm').level))"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == value
