from __future__ import annotations

from pathlib import Path

import pytest

from loraserve.adapters.validate import BaseShapes, check_adapter
from loraserve.errors import InvalidAdapter
from tests.unit.adapters.helpers import write_adapter, write_base

NAMES = frozenset({"base"})


@pytest.fixture
def base(tmp_path: Path) -> BaseShapes:
    return BaseShapes.from_folder(write_base(tmp_path / "base"))


def test_a_fitting_adapter_passes(tmp_path: Path, base: BaseShapes) -> None:
    info = check_adapter(write_adapter(tmp_path / "a"), base, NAMES, max_rank=16)
    assert info.rank == 4
    assert info.target_modules == ("q_proj", "v_proj")


def test_pickled_weights_are_refused_without_loading_them(tmp_path: Path, base: BaseShapes) -> None:
    with pytest.raises(InvalidAdapter, match="pickled"):
        check_adapter(write_adapter(tmp_path / "a", pickle_only=True), base, NAMES, max_rank=16)


def test_rank_over_the_limit_is_refused(tmp_path: Path, base: BaseShapes) -> None:
    with pytest.raises(InvalidAdapter, match="max-lora-rank"):
        check_adapter(write_adapter(tmp_path / "a", rank=32), base, NAMES, max_rank=16)


def test_modules_the_base_lacks_are_refused(tmp_path: Path, base: BaseShapes) -> None:
    with pytest.raises(InvalidAdapter, match="does not have: gate_proj"):
        check_adapter(write_adapter(tmp_path / "a", modules=("gate_proj",)), base, NAMES, max_rank=16)


def test_other_base_name_with_fitting_shapes_loads_with_a_warning(
    tmp_path: Path, base: BaseShapes, caplog: pytest.LogCaptureFixture
) -> None:
    check_adapter(write_adapter(tmp_path / "a", base_name="someone/else"), base, NAMES, max_rank=16, name="acme/x")
    assert "someone/else" in caplog.text
    assert "acme/x" in caplog.text and str(tmp_path) not in caplog.text  # the adapter, not a temp folder


def test_shapes_of_another_base_are_refused(tmp_path: Path, base: BaseShapes) -> None:
    with pytest.raises(InvalidAdapter, match="different base model"):
        check_adapter(write_adapter(tmp_path / "a", in_features=16, base_name="x"), base, NAMES, max_rank=16)


def test_non_lora_and_missing_config_are_refused(tmp_path: Path, base: BaseShapes) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text('{"peft_type": "PREFIX_TUNING"}')
    with pytest.raises(InvalidAdapter, match="only LoRA"):
        check_adapter(folder, base, NAMES, max_rank=16)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(InvalidAdapter, match="adapter_config.json"):
        check_adapter(folder, base, NAMES, max_rank=16)
