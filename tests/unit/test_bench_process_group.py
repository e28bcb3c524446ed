"""The benchmarks' view of a process group: its members' CPU time and memory, from /proc."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks._process_group import cpu_s as group_cpu_s
from benchmarks._process_group import rss_mb


def test_group_cpu_s_sums_the_cpu_of_every_process_in_the_group(tmp_path: Path) -> None:
    # A parent that computes 0.3 s and a child (same group) that computes 0.3 s, writes a marker, then both sleep.
    marker = tmp_path / "burnt"
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    child = burn + f"open({str(marker)!r}, 'w').close()\ntime.sleep(60)"
    script = burn + f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    group = subprocess.Popen([sys.executable, "-c", script], start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        used = group_cpu_s(group.pid)  # both have burnt: the child last, after its parent's burn
        # Both processes counted: one alone is ~0.3 s; /proc counts in clock ticks, so allow some undercount.
        assert 0.5 <= used < 3
        time.sleep(0.3)
        assert group_cpu_s(group.pid) - used < 0.1  # sleeping processes add nothing
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()


def test_rss_mb_counts_the_group() -> None:
    group = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(60)"],
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while rss_mb(group.pid) < 64 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert 64 <= rss_mb(group.pid) < 200
    finally:
        os.killpg(group.pid, signal.SIGKILL)
        group.wait()
