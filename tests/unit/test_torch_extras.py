"""Unloadable torch extras are hidden in this process and in every Python process started below it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve import torch_extras


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Two importable modules on PYTHONPATH: one that loads, one that fails as PyPI's torchvision does."""
    (tmp_path / "extra_that_loads.py").write_text("VALUE = 1\n")
    (tmp_path / "extra_that_breaks.py").write_text("raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setenv(torch_extras.HIDDEN_MODULES_ENV, "")
    yield tmp_path
    for name in ("extra_that_loads", "extra_that_breaks"):
        sys.modules.pop(name, None)


def _child(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=os.environ)
    return result.stdout.strip()


def test_finds_only_the_module_that_fails_to_import(modules: Path) -> None:
    assert torch_extras.find_unloadable(("extra_that_loads", "extra_that_breaks", "not_installed_at_all")) == [
        "extra_that_breaks"
    ]


def test_hidden_module_looks_uninstalled_here_and_in_child_interpreters(modules: Path) -> None:
    hidden = torch_extras.hide_unloadable(("extra_that_loads", "extra_that_breaks"))

    assert hidden == ["extra_that_breaks"]
    import importlib.util

    assert importlib.util.find_spec("extra_that_breaks") is None
    with pytest.raises(ImportError):
        import extra_that_breaks  # noqa: F401
    # A plain interpreter started below this one (as vLLM starts its registry probe and workers).
    assert _child("import importlib.util as u; print(u.find_spec('extra_that_breaks'))") == "None"
    assert _child("import extra_that_loads; print(extra_that_loads.VALUE)") == "1"


def test_the_interpreters_own_sitecustomize_still_runs(modules: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = modules / "own_site"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import builtins\nbuiltins.OWN_SITECUSTOMIZE_RAN = True\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(modules), str(own)]))

    torch_extras.hide(["extra_that_breaks"])

    assert _child("import builtins; print(getattr(builtins, 'OWN_SITECUSTOMIZE_RAN', False))") == "True"
    assert _child("import importlib.util as u; print(u.find_spec('extra_that_breaks'))") == "None"


def test_nothing_changes_when_every_extra_loads(modules: Path) -> None:
    assert torch_extras.hide_unloadable(("extra_that_loads",)) == []
    assert os.environ[torch_extras.HIDDEN_MODULES_ENV] == ""
    assert os.environ["PYTHONPATH"] == str(modules)
