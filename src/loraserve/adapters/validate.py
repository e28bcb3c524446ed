"""Check a downloaded adapter against the base model before the engine sees it.

Nothing here executes adapter content: configs are JSON, weights are read as
safetensors headers only, and pickled weights are refused.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from loraserve.errors import InvalidAdapter

logger = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLED_WEIGHTS = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class BaseShapes:
    """Linear modules of the base model: module path -> (out_features, in_features)."""

    modules: dict[str, tuple[int, int]]

    @classmethod
    def from_folder(cls, folder: Path) -> BaseShapes:
        modules: dict[str, tuple[int, int]] = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(str(file), framework="numpy") as handle:
                for key in handle.keys():
                    if key.endswith(".weight"):
                        shape = handle.get_slice(key).get_shape()
                        if len(shape) == 2:
                            modules[key[: -len(".weight")]] = (int(shape[0]), int(shape[1]))
        return cls(modules)

    def leaf_names(self) -> set[str]:
        return {path.rsplit(".", 1)[-1] for path in self.modules}


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    base_model_name: str | None
    target_modules: tuple[str, ...]


def check_adapter(
    folder: Path, base: BaseShapes, base_names: frozenset[str], max_rank: int, *, name: str | None = None
) -> AdapterInfo:
    """Raise ``InvalidAdapter`` with the reason, or describe the adapter.

    ``name`` is how logs call the adapter (the folder is often a temporary download folder).
    """
    config, rank = _check_files(folder, max_rank)
    _check_tensors(folder / WEIGHTS, base, rank)
    named_base = config.get("base_model_name_or_path")
    if isinstance(named_base, str) and named_base not in base_names:
        # Shapes fit (checked above), so it loads; a differently named base is common after re-uploads.
        logger.warning(
            "adapter %s names base %r, not the served model; its shapes fit, loading it", name or folder, named_base
        )
    return _info(config, rank)


def check_structure(folder: Path, max_rank: int) -> AdapterInfo:
    """What can be checked without the base model (for `loraserve adapters pull`): a LoRA config, and
    safetensors weights whose LoRA tensors have the config's rank. Fit to a base is checked on load."""
    config, rank = _check_files(folder, max_rank)
    lora_tensors = 0
    for key, shape in _tensor_shapes(folder / WEIGHTS).items():
        found = _LORA_KEY.fullmatch(key)
        if found is None:
            continue
        ranked = shape[0] if found.group("part") == "A" else shape[-1]  # A is (r, in), B is (out, r)
        if len(shape) != 2 or ranked != rank:
            raise InvalidAdapter(f"the adapter's tensor {key} has shape {list(shape)}, which is not of rank {rank}")
        lora_tensors += 1
    if lora_tensors == 0:
        raise InvalidAdapter("the adapter has no LoRA weights")
    return _info(config, rank)


def _info(config: dict[str, object], rank: int) -> AdapterInfo:
    named_base = config.get("base_model_name_or_path")
    targets = config.get("target_modules") or ()
    return AdapterInfo(rank, named_base if isinstance(named_base, str) else None, tuple(_as_list(targets)))


def _check_files(folder: Path, max_rank: int) -> tuple[dict[str, object], int]:
    """A LoRA config with a rank this server takes, and safetensors weights (never a pickle)."""
    config = _read_config(folder)
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidAdapter(f"only LoRA adapters are served; this one is peft_type={config.get('peft_type')!r}")
    if not (folder / WEIGHTS).is_file():
        if any((folder / name).exists() for name in PICKLED_WEIGHTS):
            raise InvalidAdapter(
                "the adapter ships only pickled weights (adapter_model.bin), which are never loaded because "
                "unpickling runs code; publish adapter_model.safetensors"
            )
        raise InvalidAdapter(f"the adapter has no {WEIGHTS}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidAdapter("adapter_config.json has no valid rank `r`")
    if rank > max_rank:
        raise InvalidAdapter(f"the adapter's rank {rank} is above this server's --max-lora-rank {max_rank}")
    return config, rank


def _read_config(folder: Path) -> dict[str, object]:
    path = folder / CONFIG
    if not path.is_file():
        raise InvalidAdapter(f"the adapter has no {CONFIG}")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG} is not valid JSON") from exc
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG} is not a JSON object")
    return config


def _as_list(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [str(v) for v in value]
    return []


def _tensor_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    try:
        # numpy, not torch: only headers are read, and the cache commands must not wait for torch to import.
        with safe_open(str(weights), framework="numpy") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    except Exception as exc:  # a corrupt file: safetensors raises several types
        raise InvalidAdapter(f"{WEIGHTS} is not a readable safetensors file") from exc


def _check_tensors(weights: Path, base: BaseShapes, rank: int) -> None:
    shapes = _tensor_shapes(weights)
    matched = 0
    unknown: set[str] = set()
    for key, shape in shapes.items():
        found = _LORA_KEY.fullmatch(key)
        if found is None:
            continue
        module = found.group("module")
        if module not in base.modules:
            unknown.add(module.rsplit(".", 1)[-1])
            continue
        out_features, in_features = base.modules[module]
        expected = (rank, in_features) if found.group("part") == "A" else (out_features, rank)
        if len(shape) != 2 or (shape[0], shape[1]) != expected:
            raise InvalidAdapter(
                f"the adapter's tensor {key} has shape {list(shape)}, but the served base model needs "
                f"{list(expected)}: it was trained for a different base model"
            )
        matched += 1
    if unknown:
        raise InvalidAdapter(
            f"the adapter targets modules the base model does not have: {', '.join(sorted(unknown))} "
            f"(the base has {', '.join(sorted(base.leaf_names()))})"
        )
    if matched == 0:
        raise InvalidAdapter("the adapter has no LoRA weights that match the base model")
