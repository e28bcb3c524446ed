"""OfflineRounds' side of the pipe, against small stand-ins for the offline engine's process (no vLLM here)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
from benchmarks.compare.offline import OfflineRounds

# Speaks the protocol: a ready line, then one answer per line read; its child sleeps in the same process group.
ENGINE = """
import json, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
open(sys.argv[1], "w").write(str(child.pid))
print("engine log line on stderr", file=sys.stderr)
print(json.dumps({"ready": True, "startup_s": 1.5}), flush=True)
for n, _ in enumerate(sys.stdin, start=1):
    print(json.dumps({"wall_s": 1.0, "output_tokens": 10 * n, "output_tok_s": 10.0 * n}), flush=True)
"""


def _rounds(script: str, tmp_path: Path, timeout_s: float = 30) -> OfflineRounds:
    class Scripted(OfflineRounds):
        @staticmethod
        def command(spec_file: Path) -> list[str]:
            return [sys.executable, "-c", script, str(spec_file)]

    return Scripted(tmp_path / "child.pid", dict(os.environ), tmp_path / "offline.log", timeout_s=timeout_s)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_rounds_are_answered_in_turn_and_close_ends_the_whole_group(tmp_path: Path) -> None:
    offline = _rounds(ENGINE, tmp_path)
    assert offline.startup_s == 1.5
    assert offline.round()["output_tokens"] == 10
    assert offline.round()["output_tok_s"] == 20.0
    grandchild = int((tmp_path / "child.pid").read_text())
    offline.close()
    deadline = time.monotonic() + 10
    while not _gone(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(grandchild) and offline.process.poll() is not None
    assert "engine log line on stderr" in (tmp_path / "offline.log").read_text()


def test_an_engine_that_dies_before_it_is_ready_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"stopped or did not answer.*offline\.log"):
        _rounds("import sys; sys.exit(3)", tmp_path)


def test_an_engine_that_does_not_answer_times_out(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="within 0.5 s"):
        _rounds("import time; time.sleep(600)", tmp_path, timeout_s=0.5)
    assert time.monotonic() - started < 30  # and the silent process was stopped, not waited for
