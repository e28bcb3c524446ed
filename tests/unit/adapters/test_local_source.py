from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import LocalSource
from loraserve.errors import InvalidAdapter, ModelNotFound
from tests.unit.adapters.helpers import write_adapter


def test_an_adapter_under_a_root_resolves_and_fetches(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_adapter(root / "team" / "a")
    source = LocalSource([root])
    snapshot = source.resolve(AdapterRef("local", "team/a"), None)
    assert {f.name for f in snapshot.files} == {"adapter_config.json", "adapter_model.safetensors"}
    dest = tmp_path / "dest"
    dest.mkdir()
    source.fetch(snapshot, dest, None)
    assert (dest / "adapter_model.safetensors").read_bytes() == (root / "team/a/adapter_model.safetensors").read_bytes()


def test_an_edit_makes_a_new_version(tmp_path: Path) -> None:
    root = tmp_path / "root"
    folder = write_adapter(root / "a")
    source = LocalSource([root])
    before = source.resolve(AdapterRef("local", "a"), None).version
    (folder / "adapter_config.json").write_text((folder / "adapter_config.json").read_text() + " ")
    assert source.resolve(AdapterRef("local", "a"), None).version != before


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    outside = write_adapter(tmp_path / "outside")
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside, root / "escape")
    inner = root / "inner"
    inner.mkdir()
    os.symlink(outside / "adapter_config.json", inner / "adapter_config.json")
    source = LocalSource([root])
    for name in ("escape", "inner", "missing"):
        with pytest.raises(ModelNotFound):
            source.resolve(AdapterRef("local", name), None)


def test_pickle_only_adapters_are_refused_at_resolve(tmp_path: Path) -> None:
    root = tmp_path / "root"
    write_adapter(root / "p", pickle_only=True)
    with pytest.raises(InvalidAdapter, match="pickled"):
        LocalSource([root]).resolve(AdapterRef("local", "p"), None)
