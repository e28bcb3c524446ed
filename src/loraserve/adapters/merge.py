"""Merge several LoRA adapters of one base into one (LoRAX's ``merged_adapters``), on the safetensors directly.

No model is built: each module's A and B are read from the inputs' files, merged, and written out, one module
at a time. The maths are peft's ``LoraModel.add_weighted_adapter`` (peft/tuners/lora/model.py and
peft/utils/merge_utils.py), so a merge here equals peft's for the same inputs:

- ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` (adapters of one rank): A and B are merged *separately*,
  each input weighted by ``sqrt(|w * scaling|)`` (the sign of ``w`` on A only), as peft's
  ``_generalized_task_arithmetic_weighted_adapter`` does; ``ties`` trims each tensor to its ``density`` largest
  magnitudes and keeps, per element, the inputs that agree with the elected sign (``majority_sign_method``);
  the ``dare_*`` strategies drop elements at random (kept with probability ``density``, rescaled by
  ``1/density``). The merged rank is the inputs' rank. Note that linear on A and B is not the weighted sum of
  the deltas B@A: the cross terms stay (peft calls it "a very rough approximation").
- ``linear`` over adapters of *different* ranks: peft refuses ``linear`` there and offers ``cat``; so does this,
  transparently: A_i * w_i * scaling_i stacked on B_i, rank = the sum of the ranks, which is exactly the
  weighted sum of the deltas. ``ties`` and ``dare_*`` over different ranks are refused (peft has only SVD
  variants for them, which change the maths).
- one adapter: ``linear`` whatever the strategy, as in peft.
- target modules that differ: the union; each module merges the inputs that have it (peft and LoRAX alike).

The merged config has ``lora_alpha == r`` (scaling 1, no rsLoRA): every input's scaling is folded into the
weights, so inputs with different ``lora_alpha``/``r``/``use_rslora`` merge correctly.

LoRAX's own server differs from peft in one way worth knowing: its ``linear`` weights A and B by ``w`` itself
(not ``sqrt(w)``) and keeps the first input's scaling, so (0.5, 0.5) there is a quarter, not a half, of the
summed product. This module follows peft, as issue 12 asks.

``dare_*`` randomness comes from a seed derived from the spec, per module, tensor and input, so the same spec
over the same inputs always gives the same bytes (a cached merge can be rebuilt identically).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from loraserve.adapters.validate import CONFIG, WEIGHTS
from loraserve.errors import InvalidMerge

if TYPE_CHECKING:
    import torch

Strategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
SignMethod = Literal["total", "frequency"]
STRATEGIES: tuple[str, ...] = get_args(Strategy)
SIGN_METHODS: tuple[str, ...] = get_args(SignMethod)

# More inputs than this is refused: each one is a download and a pass over its weights.
MAX_MERGED = 16
# Part of every merge key: bump it when the maths change, so merges cached by an older version are not reused.
_FORMAT = 1
_PARAM = "merged_adapters"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class MergeSpec:
    """What to merge and how, with LoRAX's defaults (``linear``, density 1.0, ``total``)."""

    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: Strategy = "linear"
    density: float = 1.0
    majority_sign_method: SignMethod = "total"

    def __post_init__(self) -> None:
        if not isinstance(self.ids, tuple) or not self.ids:
            raise InvalidMerge("`ids` must name at least one adapter", param=f"{_PARAM}.ids")
        if len(self.ids) > MAX_MERGED:
            raise InvalidMerge(
                f"`ids` names {len(self.ids)} adapters; at most {MAX_MERGED} merge at once", param=f"{_PARAM}.ids"
            )
        if any(not isinstance(i, str) or not i for i in self.ids):
            raise InvalidMerge("every entry of `ids` must be a non-empty adapter name", param=f"{_PARAM}.ids")
        if not isinstance(self.weights, tuple) or len(self.weights) != len(self.ids):
            raise InvalidMerge(
                f"`weights` must have one weight per adapter in `ids` ({len(self.ids)}), "
                f"got {len(self.weights) if isinstance(self.weights, tuple) else self.weights!r}",
                param=f"{_PARAM}.weights",
            )
        if any(isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) for w in self.weights):
            raise InvalidMerge("every entry of `weights` must be a finite number", param=f"{_PARAM}.weights")
        if self.strategy not in STRATEGIES:
            raise InvalidMerge(
                f"`merge_strategy` must be one of {', '.join(STRATEGIES)}; got {self.strategy!r}",
                param=f"{_PARAM}.merge_strategy",
            )
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) or not 0.0 < self.density <= 1.0:
            raise InvalidMerge(
                f"`density` must be greater than 0 and at most 1; got {self.density!r}", param=f"{_PARAM}.density"
            )
        if self.majority_sign_method not in SIGN_METHODS:
            raise InvalidMerge(
                f"`majority_sign_method` must be one of {', '.join(SIGN_METHODS)}; got {self.majority_sign_method!r}",
                param=f"{_PARAM}.majority_sign_method",
            )

    @classmethod
    def from_lorax(
        cls,
        ids: Sequence[str],
        weights: Sequence[float] | None = None,
        merge_strategy: str | None = None,
        density: float | None = None,
        majority_sign_method: str | None = None,
    ) -> MergeSpec:
        """From LoRAX's field names; a field left out (None) takes LoRAX's default, and no weights mean 1 each
        (as LoRAX's server does)."""
        return cls(
            ids=tuple(ids),
            weights=tuple(float(w) for w in weights) if weights else tuple(1.0 for _ in ids),
            strategy=cast(Strategy, merge_strategy or "linear"),
            density=1.0 if density is None else density,
            majority_sign_method=cast(SignMethod, majority_sign_method or "total"),
        )

    @property
    def effective_strategy(self) -> Strategy:
        """One adapter merges linearly whatever was asked (peft does the same)."""
        return "linear" if len(self.ids) == 1 else self.strategy

    def decisive(self) -> dict[str, Any]:
        """The fields that decide the result; the ones the strategy ignores are left out, so asking for
        ``linear`` with any density is one merge, not many."""
        strategy = self.effective_strategy
        fields: dict[str, Any] = {
            "ids": list(self.ids),
            "weights": [float(w) for w in self.weights],
            "strategy": strategy,
        }
        if strategy != "linear":
            fields["density"] = float(self.density)
        if strategy in ("ties", "dare_ties"):
            fields["majority_sign_method"] = self.majority_sign_method
        return fields

    def seed(self) -> int:
        """The seed of ``dare_*``'s random drop, derived from the spec so a merge is reproducible."""
        digest = hashlib.sha256(json.dumps(self.decisive(), sort_keys=True).encode()).digest()
        return int.from_bytes(digest[:8], "big") >> 1


def merge_key(spec: MergeSpec, versions: Sequence[str]) -> str:
    """A cache key over everything that decides a merge: the spec and each input's pinned version
    (``versions[i]`` identifies ``spec.ids[i]``: its source, name and commit or content hash).
    32 hex digits: safe as a folder name."""
    if len(versions) != len(spec.ids):
        raise ValueError(f"one version per id: {len(spec.ids)} ids, {len(versions)} versions")
    payload = {"format": _FORMAT, "spec": spec.decisive(), "versions": list(versions)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


# -- reading the inputs ---------------------------------------------------------


@dataclass(frozen=True)
class _Input:
    name: str
    config: dict[str, Any]
    rank: int
    scaling: float
    modules: dict[str, tuple[str, str]]  # module path -> (key of A, key of B) in the weights file
    shapes: dict[str, tuple[int, int]]  # module path -> (out_features, in_features)
    dtypes: dict[str, str]  # module path -> safetensors dtype name of A


def _read_input(folder: Path, name: str) -> _Input:
    from safetensors import safe_open

    try:
        config = json.loads((folder / CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidMerge(f"{name}: its {CONFIG} cannot be read", param=f"{_PARAM}.ids") from exc
    if not isinstance(config, dict) or str(config.get("peft_type", "")).upper() != "LORA":
        raise InvalidMerge(f"{name} is not a LoRA adapter; only LoRA adapters merge", param=f"{_PARAM}.ids")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise InvalidMerge(f"{name}: {CONFIG} has no valid rank `r`", param=f"{_PARAM}.ids")
    for unsupported in ("use_dora", "lora_bias"):
        if config.get(unsupported):
            raise InvalidMerge(f"{name} uses {unsupported}, which merging does not support", param=f"{_PARAM}.ids")
    for pattern in ("rank_pattern", "alpha_pattern"):
        if config.get(pattern):
            raise InvalidMerge(
                f"{name} sets a per-module {pattern}, which merging does not support", param=f"{_PARAM}.ids"
            )
    alpha = config.get("lora_alpha", 8)  # peft's default
    if isinstance(alpha, bool) or not isinstance(alpha, int | float):
        raise InvalidMerge(f"{name}: {CONFIG} has no valid `lora_alpha`", param=f"{_PARAM}.ids")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank

    parts: dict[str, dict[str, str]] = {}
    shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    dtypes: dict[str, str] = {}
    try:
        with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
            for key in handle.keys():
                found = _LORA_KEY.fullmatch(key)
                if found is None:
                    raise InvalidMerge(
                        f"{name} carries {key}, which merging does not cover: only the LoRA A and B weights of "
                        "linear layers merge",
                        param=f"{_PARAM}.ids",
                    )
                module, part = found.group("module"), found.group("part")
                if part in parts.setdefault(module, {}):
                    raise InvalidMerge(f"{name} has two lora_{part} tensors for {module}", param=f"{_PARAM}.ids")
                parts[module][part] = key
                tensor = handle.get_slice(key)
                shapes.setdefault(module, {})[part] = tuple(tensor.get_shape())
                if part == "A":
                    dtypes[module] = tensor.get_dtype()
    except InvalidMerge:
        raise
    except Exception as exc:  # a corrupt file: safetensors raises several types
        raise InvalidMerge(f"{name}: its {WEIGHTS} is not a readable safetensors file", param=f"{_PARAM}.ids") from exc

    modules: dict[str, tuple[str, str]] = {}
    out_in: dict[str, tuple[int, int]] = {}
    for module, keys in parts.items():
        if set(keys) != {"A", "B"}:
            raise InvalidMerge(f"{name} has lora_A or lora_B alone for {module}", param=f"{_PARAM}.ids")
        a_shape, b_shape = shapes[module]["A"], shapes[module]["B"]
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
            raise InvalidMerge(
                f"{name}: the weights of {module} are not of rank {rank} (A {list(a_shape)}, B {list(b_shape)})",
                param=f"{_PARAM}.ids",
            )
        modules[module] = (keys["A"], keys["B"])
        out_in[module] = (b_shape[0], a_shape[1])
    if not modules:
        raise InvalidMerge(f"{name} has no LoRA weights", param=f"{_PARAM}.ids")
    return _Input(name, config, rank, scaling, modules, out_in, dtypes)


@dataclass(frozen=True)
class _Plan:
    strategy: Literal["linear", "ties", "dare_linear", "dare_ties", "cat"]
    rank: int
    modules: tuple[str, ...]  # the union, sorted
    shapes: dict[str, tuple[int, int]]


def _plan(inputs: list[_Input], spec: MergeSpec) -> _Plan:
    ranks = [i.rank for i in inputs]
    strategy: Literal["linear", "ties", "dare_linear", "dare_ties", "cat"] = spec.effective_strategy
    rank = ranks[0]
    if len(set(ranks)) > 1:
        if strategy != "linear":
            listed = ", ".join(f"{i.name} has rank {i.rank}" for i in inputs)
            raise InvalidMerge(
                f"merge_strategy {strategy} needs adapters of one rank ({listed}); `linear` merges adapters "
                "of different ranks (by concatenation: the merged rank is the sum of theirs)",
                param=f"{_PARAM}.merge_strategy",
            )
        strategy, rank = "cat", sum(ranks)
    shapes: dict[str, tuple[int, int]] = {}
    for item in inputs:
        for module, shape in item.shapes.items():
            if shapes.setdefault(module, shape) != shape:
                raise InvalidMerge(
                    f"{item.name} and another adapter disagree on the shape of {module} "
                    f"({list(shape)} against {list(shapes[module])}): they were trained for different base models",
                    param=f"{_PARAM}.ids",
                )
    return _Plan(strategy, rank, tuple(sorted(shapes)), shapes)


def planned_size(folders: Sequence[Path], spec: MergeSpec) -> int:
    """Bytes the merged adapter will take on disk (its tensors, plus room for the headers and the config),
    from the inputs' safetensors headers alone: what to reserve in the cache before merging."""
    inputs = [_read_input(folder, name) for folder, name in zip(folders, spec.ids, strict=True)]
    plan = _plan(inputs, spec)
    total = 4096  # the config and the safetensors header's fixed part
    for module in plan.modules:
        out_features, in_features = plan.shapes[module]
        itemsize = _itemsize(_dtype_name([i.dtypes[module] for i in inputs if module in i.modules]))
        total += plan.rank * (in_features + out_features) * itemsize + 2 * (len(module) + 160)
    return total


# -- merging ----------------------------------------------------------------------


def merge_adapters(folders: Sequence[Path], spec: MergeSpec, dest: Path, seed: int | None = None) -> None:
    """Write the merge of the adapters in ``folders`` (``folders[i]`` holds ``spec.ids[i]``) into ``dest``:
    ``adapter_config.json`` and ``adapter_model.safetensors``, loadable by vLLM and peft.

    Raises ``InvalidMerge`` when the adapters cannot merge (naming the adapter and the reason). ``seed``
    overrides the seed derived from the spec (only ``dare_*`` draws random numbers).
    """
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    if len(folders) != len(spec.ids):
        raise ValueError(f"one folder per id: {len(spec.ids)} ids, {len(folders)} folders")
    inputs = [_read_input(folder, name) for folder, name in zip(folders, spec.ids, strict=True)]
    plan = _plan(inputs, spec)
    seed = spec.seed() if seed is None else seed
    merged: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f / WEIGHTS), framework="pt")) for f in folders]
        for module in plan.modules:  # one module's inputs in memory at a time
            present = [i for i, item in enumerate(inputs) if module in item.modules]
            a_list = [handles[i].get_tensor(inputs[i].modules[module][0]).to(torch.float32) for i in present]
            b_list = [handles[i].get_tensor(inputs[i].modules[module][1]).to(torch.float32) for i in present]
            weights = [spec.weights[i] * inputs[i].scaling for i in present]
            if plan.strategy == "cat":
                lora_a, lora_b = _cat(a_list, b_list, weights, plan.rank)
            else:
                # The sign goes on A only, or two negatives would cancel (peft does the same).
                signed = [math.sqrt(abs(w)) * (1.0 if w >= 0 else -1.0) for w in weights]
                unsigned = [math.sqrt(abs(w)) for w in weights]
                generators = {part: [_generator(seed, module, part, i) for i in present] for part in ("A", "B")}
                lora_a = _combine(a_list, signed, plan.strategy, spec, generators["A"])
                lora_b = _combine(b_list, unsigned, plan.strategy, spec, generators["B"])
            dtype = getattr(torch, _dtype_name([inputs[i].dtypes[module] for i in present]))
            merged[f"base_model.model.{module}.lora_A.weight"] = lora_a.to(dtype).contiguous()
            merged[f"base_model.model.{module}.lora_B.weight"] = lora_b.to(dtype).contiguous()
            del a_list, b_list
    # One metadata key only: safetensors writes several in a random order, and a merge must be the same bytes.
    save_file(merged, str(dest / WEIGHTS), metadata={"format": "pt"})
    (dest / CONFIG).write_text(json.dumps(_merged_config(inputs, plan), indent=2, sort_keys=True) + "\n")


def _merged_config(inputs: list[_Input], plan: _Plan) -> dict[str, Any]:
    """The first input's config (as peft's ``replace(peft_config[adapters[0]], ...)``) with the merged rank,
    ``lora_alpha == r`` (every scaling is in the weights now) and the modules the weights cover."""
    config = dict(inputs[0].config)
    config.update(
        r=plan.rank,
        lora_alpha=plan.rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted({module.rsplit(".", 1)[-1] for module in plan.modules}),
        layers_to_transform=None,
        layers_pattern=None,
        modules_to_save=None,
    )
    return config


def _cat(
    a_list: list[torch.Tensor], b_list: list[torch.Tensor], weights: list[float], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's ``cat``: A_i * w_i * scaling_i stacked, B_i side by side (zero rows for inputs without the module)."""
    import torch

    lora_a = torch.cat([a * w for a, w in zip(a_list, weights, strict=True)], dim=0)
    lora_b = torch.cat(b_list, dim=1)
    missing = rank - lora_a.shape[0]
    if missing:
        lora_a = torch.cat([lora_a, lora_a.new_zeros(missing, lora_a.shape[1])], dim=0)
        lora_b = torch.cat([lora_b, lora_b.new_zeros(lora_b.shape[0], missing)], dim=1)
    return lora_a, lora_b


def _combine(
    tensors: list[torch.Tensor],
    weights: list[float],
    strategy: str,
    spec: MergeSpec,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """peft's merge_utils (task_arithmetic, ties, dare_linear, dare_ties) on one part (A or B) of one module."""
    import torch

    if strategy in ("ties", "dare_ties", "dare_linear") and spec.density < 1.0:
        if strategy == "ties":
            tensors = [_magnitude_prune(t, spec.density) for t in tensors]
        else:
            tensors = [_random_prune(t, spec.density, g) for t, g in zip(tensors, generators, strict=True)]
    stacked = torch.stack(tensors, dim=0)
    weighted = stacked * torch.tensor(weights, dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))
    if strategy in ("linear", "dare_linear"):
        return weighted.sum(dim=0)
    # TIES: elect the sign per element on the unweighted tensors, then average the inputs that agree with it.
    sign = stacked.sign()
    magnitude = stacked.sum(dim=0) if spec.majority_sign_method == "total" else sign.sum(dim=0)
    majority = torch.where(magnitude >= 0, 1.0, -1.0)
    agree = sign == majority
    return (weighted * agree).sum(dim=0) / torch.clamp(agree.sum(dim=0), min=1.0)


def _magnitude_prune(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (peft's ``magnitude_based_pruning``)."""
    import torch

    keep = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype)
    mask[torch.topk(tensor.abs().reshape(-1), k=keep, largest=True).indices] = 1
    return tensor * mask.reshape(tensor.shape)


def _random_prune(tensor: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Keep each element with probability ``density`` and rescale by ``1/density`` (peft's ``random_pruning``)."""
    import torch

    mask = torch.bernoulli(torch.full_like(tensor, density), generator=generator)
    return tensor * mask / density


def _generator(seed: int, module: str, part: str, index: int) -> torch.Generator:
    """A generator of its own per tensor: the drop does not depend on the order modules are merged in."""
    import torch

    digest = hashlib.sha256(f"{seed}:{module}:{part}:{index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "big") >> 1)


_TORCH_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


def _dtype_name(names: list[str]) -> str:
    """The dtype the merged tensor is written in: the inputs' own, or float32 when they differ (or are not
    floating point)."""
    distinct = set(names)
    if len(distinct) == 1 and (only := distinct.pop()) in _TORCH_NAMES:
        return _TORCH_NAMES[only]
    return "float32"


def _itemsize(torch_name: str) -> int:
    return {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}[torch_name]
