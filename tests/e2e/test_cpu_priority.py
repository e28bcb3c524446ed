"""On this CPU machine, vLLM's engine processes run under SCHED_IDLE beside a server that keeps the fair share."""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks._process_group import members

from tests.e2e.conftest import RunningServer


def _group(pgid: int) -> dict[int, str]:
    """The processes of a process group: pid -> name."""
    found: dict[int, str] = {}
    for entry in members(pgid):
        try:
            found[int(entry.name)] = (entry / "comm").read_text().strip()
        except OSError:
            continue  # ended while listed
    return found


def _policies(pid: int) -> set[int]:
    policies = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            policies.add(os.sched_getscheduler(int(task.name)))
        except OSError:
            continue  # a thread that just ended
    return policies


def test_the_engine_steps_aside_for_the_server(server: RunningServer) -> None:
    group = _group(server.pid)
    engine = [pid for pid, name in group.items() if name.startswith("VLLM::")]
    assert {group[pid] for pid in engine} >= {"VLLM::EngineCor", "VLLM::Worker"}  # /proc cuts names at 15
    for pid in engine:
        assert _policies(pid) == {os.SCHED_IDLE}, group[pid]
    assert os.SCHED_IDLE not in _policies(server.pid)
