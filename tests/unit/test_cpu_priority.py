"""The engine processes' CPU policy: set by the server for the processes it starts, applied by vLLM's plugin load."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from loraserve.engine import cpu_priority
from loraserve.engine.cpu_priority import YIELD_TO_ENV, set_engine_priority

pytestmark = pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux's")

# A process that runs the plugin with the variable naming another process (pid 1), with one thread started
# before and one after it, and prints every thread's policy.
_CHILD = textwrap.dedent(
    """
    import os, threading
    from loraserve.engine.cpu_priority import apply
    release = threading.Event()
    before = threading.Thread(target=release.wait)
    before.start()
    apply()
    after = threading.Thread(target=release.wait)
    after.start()
    print(sorted({os.sched_getscheduler(int(tid)) for tid in os.listdir("/proc/self/task")}))
    release.set()
    """
)


def _child_policies(environ: dict[str, str]) -> str:
    done = subprocess.run([sys.executable, "-c", _CHILD], env=environ, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_idle_names_this_process_and_normal_clears_it() -> None:
    environ: dict[str, str] = {}
    set_engine_priority("idle", environ)
    assert environ == {YIELD_TO_ENV: str(os.getpid())}
    set_engine_priority("normal", environ)
    assert environ == {}


def test_a_process_started_to_yield_puts_every_thread_under_sched_idle() -> None:
    environ = {**os.environ, YIELD_TO_ENV: "1"}
    assert _child_policies(environ) == f"[{os.SCHED_IDLE}]"  # the threads before the plugin and after it


def test_a_process_not_started_to_yield_keeps_the_fair_share() -> None:
    environ = {k: v for k, v in os.environ.items() if k != YIELD_TO_ENV}
    assert _child_policies(environ) == f"[{os.sched_getscheduler(0)}]"  # this test's own, inherited


def test_the_server_itself_never_yields(monkeypatch: pytest.MonkeyPatch) -> None:
    # vLLM loads its plugins in the server's process too (the front end of AsyncLLM).
    monkeypatch.setenv(YIELD_TO_ENV, str(os.getpid()))
    before = os.sched_getscheduler(0)
    cpu_priority.apply()
    assert os.sched_getscheduler(0) == before != os.SCHED_IDLE
