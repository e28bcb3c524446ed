"""Settings for every Python process started below the server, applied before their first import.

vLLM starts interpreters of its own (its EngineCore and workers, and helper
subprocesses such as ``python -m vllm.model_executor.models.registry``), and
none of them runs loraserve's code before importing vLLM. ``install()`` puts
this folder's ``sitecustomize.py`` on ``PYTHONPATH``, which site imports first
in each of them.
"""

from __future__ import annotations

import os
from pathlib import Path

_FOLDER = str(Path(__file__).resolve().parent)


def install() -> None:
    """Make every Python process started from now on run this folder's sitecustomize."""
    rest = [entry for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep) if entry and entry != _FOLDER]
    os.environ["PYTHONPATH"] = os.pathsep.join([_FOLDER, *rest])
