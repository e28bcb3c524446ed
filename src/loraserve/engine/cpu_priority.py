"""On a CPU, vLLM's engine processes step aside for the process that serves HTTP.

The engine computes on every core (``apply_cpu_defaults``), and between its steps its EngineCore and worker
spin while they wait for each other, so the cores are never free. The server's own work (reading requests,
tokenizing, streaming tokens, fetching a new adapter from the Hub) then waits, at every wake-up, for a busy
thread's time slice to end. With the engine's threads under ``SCHED_IDLE`` they run whenever a core is free and
give it up as soon as the server (or anything else on the machine) has work. Measured here in one server with
the policy switched between blocks (benchmarks/README.md, scenario 6): 7 % more requests/s while adapters churn
(a new adapter's download no longer waits on busy engine threads), adapters ÷ base 0.93 instead of 0.89, the
base alone unchanged.

The cost: anything else busy on the machine comes before the engine, as the server does. ``normal`` (the
``--engine-cpu-priority`` flag) keeps the kernel's fair share.

The server writes its own pid into ``YIELD_TO_ENV`` before it starts the engine; vLLM loads ``apply`` as a
general plugin in every one of its processes, and each but the server switches. Threads started later (the
worker's OpenMP threads, the EngineCore's socket threads) inherit the policy from the thread that starts them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import MutableMapping
from typing import Literal

logger = logging.getLogger(__name__)

YIELD_TO_ENV = "LORASERVE_ENGINE_YIELDS_TO"

CpuPriority = Literal["idle", "normal"]


def set_engine_priority(priority: CpuPriority, environ: MutableMapping[str, str] = os.environ) -> None:
    """Make the engine processes started from now on yield to this one (``idle``), or not (``normal``)."""
    if priority == "idle":
        environ[YIELD_TO_ENV] = str(os.getpid())
    else:
        environ.pop(YIELD_TO_ENV, None)


def apply() -> None:
    """vLLM general plugin: in an engine process started to yield, every thread goes to ``SCHED_IDLE``."""
    owner = os.environ.get(YIELD_TO_ENV)
    if not owner or owner == str(os.getpid()) or not hasattr(os, "SCHED_IDLE"):
        return  # the server itself, a process not started by one, or not Linux
    switched = 0
    for tid in _threads():
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            switched += 1
        except OSError as exc:  # a thread that just ended, or a sandbox that forbids the call: fair share then
            logger.debug("Could not lower the CPU priority of thread %d: %s", tid, exc)
    logger.debug("Engine process %d: %d threads under SCHED_IDLE", os.getpid(), switched)


def _threads() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc/self/task")]
    except OSError:
        return [0]  # no /proc: the calling thread, which starts the others
