"""Merged adapters against peft's own ``add_weighted_adapter``, on a tiny Llama (hidden 16, 2 layers)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraserve.adapters.merge import MAX_MERGED, MergeSpec, merge_adapters, merge_key, planned_size
from loraserve.adapters.validate import BaseShapes, check_adapter
from loraserve.errors import InvalidMerge
from tests.unit.adapters.helpers import write_adapter

QV = ("q_proj", "v_proj")


@dataclass
class Made:
    base: Any
    base_dir: Path
    adapters: dict[str, Path]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("merge")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        config = LlamaConfig(
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            vocab_size=64,
        )
        base = LlamaForCausalLM(config).eval()
        base_dir = root / "base"
        base.save_pretrained(str(base_dir))
        specs: dict[str, dict[str, Any]] = {
            "a": {"r": 4, "lora_alpha": 8, "target_modules": list(QV), "seed": 1},
            "b": {"r": 4, "lora_alpha": 16, "target_modules": list(QV), "seed": 2},  # another scaling
            "c": {"r": 8, "lora_alpha": 8, "target_modules": list(QV), "seed": 3},  # another rank
            "d": {"r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "k_proj", "o_proj"], "seed": 4},
            "e": {"r": 4, "lora_alpha": 8, "target_modules": list(QV), "use_rslora": True, "seed": 5},
        }
        adapters = {}
        for name, spec in specs.items():
            seed = spec.pop("seed")
            torch.manual_seed(seed)
            peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
            adapters[name] = root / name
            peft_model.save_pretrained(str(adapters[name]))
    return Made(base, base_dir, adapters)


def _merge(made: Made, tmp_path: Path, spec: MergeSpec, seed: int | None = None) -> Path:
    dest = tmp_path / "merged"
    dest.mkdir(parents=True, exist_ok=True)
    merge_adapters([made.adapters[i] for i in spec.ids], spec, dest, seed=seed)
    return dest


def _deltas(folder: Path) -> dict[str, torch.Tensor]:
    """B @ A * scaling per module, from an adapter's files."""
    config = json.loads((folder / "adapter_config.json").read_text())
    r = config["r"]
    scaling = config["lora_alpha"] / (r**0.5 if config.get("use_rslora") else r)
    tensors = load_file(str(folder / "adapter_model.safetensors"))
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            deltas[module] = tensors[key.replace("lora_A", "lora_B")] @ a * scaling
    return deltas


def _peft_deltas(made: Made, names: Sequence[str], weights: Sequence[float], combination: str, **kwargs: Any) -> Any:
    """peft's add_weighted_adapter over the same adapters: the reference."""
    model = PeftModel.from_pretrained(copy.deepcopy(made.base), str(made.adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(made.adapters[name]), adapter_name=name)
    with torch.random.fork_rng(devices=[]):
        model.add_weighted_adapter(list(names), list(weights), "merged", combination_type=combination, **kwargs)
    deltas = {}
    for path, module in model.named_modules():
        if hasattr(module, "lora_A") and "merged" in module.lora_A:
            deltas[path.removeprefix("base_model.model.")] = module.get_delta_weight("merged").detach()
    return deltas


def _assert_same(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> None:
    assert sorted(ours) == sorted(reference)
    for module, delta in reference.items():
        torch.testing.assert_close(ours[module], delta, rtol=1e-5, atol=1e-6, msg=module)


def test_weights_one_and_zero_equal_the_first_adapter_alone(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("b", "a"), (1.0, 0.0)))
    _assert_same(_deltas(merged), _deltas(made.adapters["b"]))


def test_linear_halves_equal_peft_linear(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a", "b"), (0.5, 0.5)))
    _assert_same(_deltas(merged), _peft_deltas(made, ["a", "b"], [0.5, 0.5], "linear"))
    config = json.loads((merged / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 4, ["q_proj", "v_proj"])


def test_negative_weights_equal_peft_linear(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a", "b"), (1.0, -0.5)))
    _assert_same(_deltas(merged), _peft_deltas(made, ["a", "b"], [1.0, -0.5], "linear"))


@pytest.mark.parametrize("density", [1.0, 0.5])
@pytest.mark.parametrize("method", ["total", "frequency"])
def test_ties_equals_peft_ties(made: Made, tmp_path: Path, density: float, method: str) -> None:
    spec = MergeSpec(("a", "b"), (0.7, 0.3), "ties", density, method)  # type: ignore[arg-type]
    merged = _merge(made, tmp_path, spec)
    reference = _peft_deltas(made, ["a", "b"], [0.7, 0.3], "ties", density=density, majority_sign_method=method)
    _assert_same(_deltas(merged), reference)


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_at_full_density_equals_peft_dare(made: Made, tmp_path: Path, strategy: str) -> None:
    spec = MergeSpec(("a", "b"), (0.7, 0.3), strategy, 1.0)  # type: ignore[arg-type]
    merged = _merge(made, tmp_path, spec)
    _assert_same(_deltas(merged), _peft_deltas(made, ["a", "b"], [0.7, 0.3], strategy, density=1.0))


def test_dare_linear_drops_about_one_minus_density_and_rescales_the_rest(made: Made, tmp_path: Path) -> None:
    # Weights (1, 0): the merge is the first adapter's tensors, thinned, times sqrt(scaling) / density.
    folder = _merge(made, tmp_path, MergeSpec(("a", "b"), (1.0, 0.0), "dare_linear", 0.3))
    merged = load_file(str(folder / "adapter_model.safetensors"))
    original = load_file(str(made.adapters["a"] / "adapter_model.safetensors"))
    scale = (8 / 4) ** 0.5 / 0.3
    kept = total = 0
    for key, tensor in merged.items():
        mask = tensor != 0
        kept += int(mask.sum())
        total += tensor.numel()
        torch.testing.assert_close(tensor[mask], original[key][mask] * scale)
    assert 0.2 < kept / total < 0.4


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_is_the_same_for_one_spec_and_differs_with_the_seed(made: Made, tmp_path: Path, strategy: str) -> None:
    spec = MergeSpec(("a", "b"), (0.6, 0.4), strategy, 0.5)  # type: ignore[arg-type]
    first = (_merge(made, tmp_path / "1", spec) / "adapter_model.safetensors").read_bytes()
    again = (_merge(made, tmp_path / "2", spec) / "adapter_model.safetensors").read_bytes()
    other = (_merge(made, tmp_path / "3", spec, seed=spec.seed() + 1) / "adapter_model.safetensors").read_bytes()
    assert first == again
    assert first != other


def test_linear_over_different_ranks_concatenates_as_peft_cat(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a", "c"), (0.7, 0.3)))
    assert json.loads((merged / "adapter_config.json").read_text())["r"] == 12
    _assert_same(_deltas(merged), _peft_deltas(made, ["a", "c"], [0.7, 0.3], "cat"))
    exact = {m: 0.7 * d + 0.3 * _deltas(made.adapters["c"])[m] for m, d in _deltas(made.adapters["a"]).items()}
    _assert_same(_deltas(merged), exact)


@pytest.mark.parametrize("strategy", ["ties", "dare_linear", "dare_ties"])
def test_other_strategies_refuse_different_ranks_naming_them(made: Made, tmp_path: Path, strategy: str) -> None:
    with pytest.raises(InvalidMerge, match="a has rank 4, c has rank 8") as caught:
        _merge(made, tmp_path, MergeSpec(("a", "c"), (0.5, 0.5), strategy))  # type: ignore[arg-type]
    assert caught.value.param == "merged_adapters.merge_strategy"


@pytest.mark.parametrize("strategy", ["linear", "ties"])
def test_different_target_modules_merge_over_their_union_as_peft(made: Made, tmp_path: Path, strategy: str) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a", "d"), (0.6, 0.4), strategy, 0.5))  # type: ignore[arg-type]
    reference = _peft_deltas(made, ["a", "d"], [0.6, 0.4], strategy, density=0.5)
    _assert_same(_deltas(merged), reference)
    targets = json.loads((merged / "adapter_config.json").read_text())["target_modules"]
    assert targets == ["k_proj", "o_proj", "q_proj", "v_proj"]


def test_rslora_scaling_is_folded_into_the_weights(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a", "e"), (0.5, 0.5)))
    _assert_same(_deltas(merged), _peft_deltas(made, ["a", "e"], [0.5, 0.5], "linear"))
    assert json.loads((merged / "adapter_config.json").read_text())["use_rslora"] is False


def test_one_adapter_merges_linearly_whatever_the_strategy(made: Made, tmp_path: Path) -> None:
    merged = _merge(made, tmp_path, MergeSpec(("a",), (0.5,), "ties", 0.2))
    _assert_same(_deltas(merged), {m: 0.5 * d for m, d in _deltas(made.adapters["a"]).items()})


def test_the_merge_passes_the_server_checks_and_loads_in_peft(made: Made, tmp_path: Path) -> None:
    spec = MergeSpec(("a", "d"), (0.5, 0.5))
    merged = _merge(made, tmp_path, spec)
    info = check_adapter(merged, BaseShapes.from_folder(made.base_dir), frozenset(), max_rank=16)
    assert info.rank == 4
    model = PeftModel.from_pretrained(copy.deepcopy(made.base), str(merged))
    loaded = {
        path.removeprefix("base_model.model."): module.get_delta_weight("default").detach()
        for path, module in model.named_modules()
        if hasattr(module, "lora_A") and "default" in module.lora_A
    }
    ours = _deltas(merged)
    for module, delta in ours.items():
        torch.testing.assert_close(loaded[module], delta)
    actual = (merged / "adapter_model.safetensors").stat().st_size + (merged / "adapter_config.json").stat().st_size
    planned = planned_size([made.adapters["a"], made.adapters["d"]], spec)
    assert actual <= planned < actual * 2


def test_adapters_for_different_bases_are_refused(tmp_path: Path) -> None:
    narrow = write_adapter(tmp_path / "narrow", in_features=8)
    wide = write_adapter(tmp_path / "wide", in_features=16)
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidMerge, match="trained for different base models"):
        merge_adapters([narrow, wide], MergeSpec(("narrow", "wide"), (1.0, 1.0)), tmp_path / "out")


def test_weights_merging_cannot_cover_are_refused_by_name(tmp_path: Path) -> None:
    plain = write_adapter(tmp_path / "plain")
    extra = write_adapter(tmp_path / "extra")
    tensors = load_file(str(extra / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(extra / "adapter_model.safetensors"))
    (tmp_path / "out").mkdir()
    with pytest.raises(InvalidMerge, match="extra carries base_model.model.lm_head.weight"):
        merge_adapters([plain, extra], MergeSpec(("plain", "extra"), (1.0, 1.0)), tmp_path / "out")


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        ({"ids": ()}, "merged_adapters.ids", "at least one adapter"),
        ({"ids": ("a", "")}, "merged_adapters.ids", "non-empty"),
        ({"ids": ("a",) * (MAX_MERGED + 1), "weights": (1.0,) * (MAX_MERGED + 1)}, "merged_adapters.ids", "at most"),
        ({"weights": (1.0,)}, "merged_adapters.weights", "one weight per adapter"),
        ({"weights": (1.0, float("nan"))}, "merged_adapters.weights", "finite"),
        ({"strategy": "svd"}, "merged_adapters.merge_strategy", "one of linear, ties, dare_linear, dare_ties"),
        ({"density": 0.0}, "merged_adapters.density", "greater than 0"),
        ({"density": 1.5}, "merged_adapters.density", "at most 1"),
        ({"majority_sign_method": "mean"}, "merged_adapters.majority_sign_method", "total, frequency"),
    ],
)
def test_invalid_specs_name_the_field(fields: dict[str, Any], param: str, says: str) -> None:
    arguments: dict[str, Any] = {"ids": ("a", "b"), "weights": (0.5, 0.5), **fields}
    with pytest.raises(InvalidMerge, match=says) as caught:
        MergeSpec(**arguments)
    assert caught.value.param == param
    assert caught.value.status == 400


def test_lorax_fields_take_lorax_defaults() -> None:
    spec = MergeSpec.from_lorax(["a", "b"], [1, 2])
    assert spec == MergeSpec(("a", "b"), (1.0, 2.0), "linear", 1.0, "total")
    assert MergeSpec.from_lorax(["a", "b"]).weights == (1.0, 1.0)  # LoRAX's server: no weights weigh 1 each
    with pytest.raises(InvalidMerge):
        MergeSpec.from_lorax(["a", "b"], merge_strategy="nope")


def test_merge_key_covers_the_inputs_versions_and_what_decides_the_result() -> None:
    spec = MergeSpec(("a", "b"), (0.5, 0.5))
    key = merge_key(spec, ["hub:a@1", "hub:b@1"])
    assert len(key) == 32 and int(key, 16) >= 0
    assert key == merge_key(MergeSpec(("a", "b"), (0.5, 0.5)), ["hub:a@1", "hub:b@1"])
    assert key != merge_key(spec, ["hub:a@1", "hub:b@2"])
    assert key != merge_key(MergeSpec(("a", "b"), (0.5, 0.6)), ["hub:a@1", "hub:b@1"])
    assert key != merge_key(MergeSpec(("a", "b"), (0.5, 0.5), "ties"), ["hub:a@1", "hub:b@1"])
    # linear ignores density and the sign method: asking with other values is the same merge.
    assert key == merge_key(MergeSpec(("a", "b"), (0.5, 0.5), "linear", 0.3, "frequency"), ["hub:a@1", "hub:b@1"])
    ties = MergeSpec(("a", "b"), (0.5, 0.5), "ties", 0.3)
    assert merge_key(ties, ["hub:a@1", "hub:b@1"]) != merge_key(
        MergeSpec(("a", "b"), (0.5, 0.5), "ties", 0.4), ["hub:a@1", "hub:b@1"]
    )
