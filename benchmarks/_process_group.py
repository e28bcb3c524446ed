"""The live processes of a process group, read from /proc: the benchmarks start each server in a group of its own."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path


def members(pgid: int) -> Iterator[Path]:
    """``/proc/<pid>`` of every live process in group ``pgid`` (processes that exit meanwhile are skipped)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) == pgid:
                yield entry
        except OSError:  # exited meanwhile
            continue


def cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of group ``pgid``."""
    ticks = 0
    for entry in members(pgid):
        try:
            # The fields after the command's closing parenthesis; utime and stime are the 14th and 15th of stat.
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def rss_mb(pgid: int) -> float:
    """Resident memory of the group's processes, in MiB."""
    total = 0
    for entry in members(pgid):
        try:
            for line in (entry / "status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except (OSError, ValueError):
            continue
    return total / 1024
