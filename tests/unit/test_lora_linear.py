"""loraserve's planned ``add_lora_linear``: every slice of a layer at once, each row through its own slot only.

Checked against a plain per-row reference (``y[row] += scale * B[slot] @ A[slot] @ x[row]`` per slice, nothing for
-1) and against vLLM's ``PunicaWrapperCPU`` itself with loraserve's corrected ops, through the wrapper's real
``update_metadata``.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from loraserve.engine import lora_fix, lora_linear, lora_slots

SLOTS, HIDDEN, RANK = 4, 12, 4
SLICES = (10, 6, 6)  # q, k, v
PATTERNS = {
    "one-slot": [2, 2, 2, 2],
    "runs": [0, 0, 0, -1, -1, 1, 1, 1],
    "interleaved": [0, 1, -1, 2, 0, 1, 3, -1, 2, 0],  # few rows: every row times every slot, masked
    "interleaved-long": [0, 1, -1, 2, 0, 1, 3, -1, 2, 0] * 50,  # too many rows for that: gathered per slot
    "all-base": [-1, -1, -1],
    "one-row": [1],
    "zero-slot-only": [3, 3, -1],
}


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weights(slices: tuple[int, ...], seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """Stacked (slots, 1, rows, cols) A and B per slice: slot 1 uses rank 2 of 4, slot 3 is zero (a module the
    slot's adapter leaves alone)."""
    lora_a = tuple(_randn(SLOTS, 1, RANK, HIDDEN, seed=seed + i) for i in range(len(slices)))
    lora_b = tuple(_randn(SLOTS, 1, size, RANK, seed=seed + 10 + i) for i, size in enumerate(slices))
    for a, b in zip(lora_a, lora_b, strict=True):
        a[1, 0, 2:] = 0
        b[1, 0, :, 2:] = 0
        a[3] = 0
        b[3] = 0
    return lora_a, lora_b


def reference(
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a: tuple[torch.Tensor, ...],
    lora_b: tuple[torch.Tensor, ...],
    scale: float,
    slices: tuple[int, ...],
    indices: list[int],
) -> torch.Tensor:
    out = y.double().clone()
    for row, slot in enumerate(indices):
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(lora_a, lora_b, slices, strict=True):
            out[row, offset : offset + size] += scale * (b[slot, 0].double() @ (a[slot, 0].double() @ x[row].double()))
            offset += size
    return out


def _plan(indices: list[int]) -> lora_linear.StepPlan:
    return lora_linear.StepPlan(indices)


@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("slices", [SLICES, (9,)], ids=["qkv", "one-slice"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_planned_equals_the_per_row_reference(pattern: str, slices: tuple[int, ...], scale: float) -> None:
    indices = PATTERNS[pattern]
    lora_a, lora_b = _weights(slices, seed=1)
    x = _randn(len(indices), HIDDEN, seed=2)
    y = _randn(len(indices), sum(slices), seed=3)
    expected = reference(y, x, lora_a, lora_b, scale, slices, indices)
    assert lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, scale, slices)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_rows_without_an_adapter_are_never_touched(pattern: str) -> None:
    indices = PATTERNS[pattern]
    lora_a, lora_b = _weights(SLICES, seed=4)
    x = _randn(len(indices), HIDDEN, seed=5)
    y0 = _randn(len(indices), sum(SLICES), seed=6)
    y = y0.clone()
    lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, 1.0, SLICES)
    for row, slot in enumerate(indices):
        if slot < 0 or slot == 3:  # no adapter, or an adapter that leaves this layer alone
            assert torch.equal(y[row], y0[row]), row


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pattern", ["runs", "interleaved"])
def test_half_precision_is_computed_in_float32(dtype: torch.dtype, pattern: str) -> None:
    indices = PATTERNS[pattern]
    lora_a, lora_b = (tuple(t.to(dtype) for t in ts) for ts in _weights(SLICES, seed=7))
    x = _randn(len(indices), HIDDEN, seed=8).to(dtype)
    y = _randn(len(indices), sum(SLICES), seed=9).to(dtype)
    expected = reference(y, x, lora_a, lora_b, 1.0, SLICES, indices).to(dtype)
    assert lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, 1.0, SLICES)
    assert y.dtype == dtype
    # The float32 sum rounded once: within one unit in the last place of the exact sum rounded (a BLAS may sum in
    # another order and flip a tie); products rounded to the half dtype first would be several units off.
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(y, expected, atol=eps, rtol=eps)


def test_the_used_rank_is_the_last_rank_row_both_matrices_carry() -> None:
    a, b = torch.zeros(RANK, HIDDEN), torch.zeros(6, RANK)
    assert lora_linear._used_rank(a, b) == 0  # a module the adapter leaves alone
    a[0, 3] = 1.0
    b[2, 0] = 1.0
    assert lora_linear._used_rank(a, b) == 1
    a[2, 0] = 1.0  # rank row 2 in A only: B has no column for it, so it adds nothing
    assert lora_linear._used_rank(a, b) == 1
    b[0, 2] = -1.0  # rows 0 and 2 carry it, row 1 is a zero inside the rank: kept, the slice is leading rows
    assert lora_linear._used_rank(a, b) == 3


def test_the_masked_path_is_taken_only_while_it_is_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[int] = []
    original = lora_linear._add_masked
    monkeypatch.setattr(
        lora_linear, "_add_masked", lambda plan, *args: taken.append(plan.tokens) or original(plan, *args)
    )
    lora_a, lora_b = _weights(SLICES, seed=30)
    for pattern in ("interleaved", "interleaved-long", "runs"):
        indices = PATTERNS[pattern]
        y = torch.zeros(len(indices), sum(SLICES))
        lora_linear.add_lora_linear(
            _plan(indices), y, _randn(len(indices), HIDDEN, seed=31), lora_a, lora_b, 1.0, SLICES
        )
    assert taken == [len(PATTERNS["interleaved"])]


def test_a_row_without_an_adapter_stays_untouched_when_its_input_overflows_the_adapters() -> None:
    indices = PATTERNS["interleaved"]
    lora_a, lora_b = _weights(SLICES, seed=32)
    x = _randn(len(indices), HIDDEN, seed=33)
    x[2] = float("inf")  # a base row: inf times the other rows' adapters, then masked, must not become NaN
    y0 = _randn(len(indices), sum(SLICES), seed=34)
    y = y0.clone()
    assert lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, 1.0, SLICES)
    assert torch.equal(y[2], y0[2])
    assert torch.isfinite(y[[0, 1, 3, 4, 5]]).all()


def test_long_runs_expand_slice_by_slice() -> None:
    indices = [0] * 40 + [1] * 40  # longer than _LONG_RUN: per-slice products instead of one block-diagonal
    lora_a, lora_b = _weights(SLICES, seed=10)
    x = _randn(len(indices), HIDDEN, seed=11)
    y = _randn(len(indices), sum(SLICES), seed=12)
    expected = reference(y, x, lora_a, lora_b, 1.0, SLICES, indices)
    assert lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, 1.0, SLICES)
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)


def test_a_write_into_a_slot_is_seen_at_the_next_call() -> None:
    indices = [0, 1, 0, 1, 3, 2]
    lora_a, lora_b = _weights(SLICES, seed=13)
    x = _randn(len(indices), HIDDEN, seed=14)
    plan = _plan(indices)
    lora_linear.add_lora_linear(plan, torch.zeros(len(indices), sum(SLICES)), x, lora_a, lora_b, 1.0, SLICES)
    # vLLM loads a new adapter into slots 0 and 3 (copy_ into the stacked tensors) and resets slot 1 to zero.
    for i, (a, b) in enumerate(zip(lora_a, lora_b, strict=True)):
        a[0, 0].copy_(_randn(RANK, HIDDEN, seed=20 + i))
        b[3, 0].copy_(_randn(SLICES[i], RANK, seed=30 + i))
        a[3, 0].copy_(_randn(RANK, HIDDEN, seed=40 + i))
        a[1] = 0
        b[1] = 0
    y = torch.zeros(len(indices), sum(SLICES))
    lora_linear.add_lora_linear(plan, y, x, lora_a, lora_b, 1.0, SLICES)
    torch.testing.assert_close(
        y.double(), reference(torch.zeros_like(y), x, lora_a, lora_b, 1.0, SLICES, indices), atol=1e-5, rtol=1e-5
    )
    assert torch.equal(y[[1, 3]], torch.zeros(2, sum(SLICES)))


class _Manager:
    """vLLM's LoRAModelManager as far as the slot tracking sees it: activate_adapter writes one slot per layer."""

    def __init__(self, layers: list[tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]]) -> None:
        self.modules = {
            f"layer{i}": SimpleNamespace(lora_a_stacked=a, lora_b_stacked=b) for i, (a, b) in enumerate(layers)
        }
        self.modules["embedding"] = SimpleNamespace(lora_a_stacked=torch.zeros(SLOTS, 1, 2, 2))  # not a linear layer
        self.lora_index_to_id: list[int | None] = [None] * SLOTS
        self._active_adapters: set[int] = set()
        self.weights: dict[int, int] = {}

    def activate_adapter(self, lora_id: int) -> bool:
        if lora_id in self._active_adapters:
            return False
        self._active_adapters.add(lora_id)
        slot = self.lora_index_to_id.index(None)
        self.lora_index_to_id[slot] = lora_id
        for i, module in enumerate(m for m in self.modules.values() if isinstance(m.lora_a_stacked, tuple)):
            for j, (a, b) in enumerate(zip(module.lora_a_stacked, module.lora_b_stacked, strict=True)):
                a[slot] = 0
                b[slot] = 0
                a[slot, 0].copy_(_randn(RANK, HIDDEN, seed=100 * lora_id + 10 * i + j))
                b[slot, 0].copy_(_randn(b.shape[2], RANK, seed=100 * lora_id + 10 * i + j + 5))
        return True

    def deactivate(self, lora_id: int) -> None:
        self.lora_index_to_id[self.lora_index_to_id.index(lora_id)] = None
        self._active_adapters.discard(lora_id)


def test_a_slot_write_seen_by_the_manager_keeps_the_other_slots() -> None:
    layers = [_weights(SLICES, seed=seed) for seed in (21, 22)]
    manager_class = type("Manager", (_Manager,), {})
    lora_linear.track_slot_writes(manager_class)
    manager = manager_class(layers)
    for lora_id in (1, 2, 3):
        assert manager.activate_adapter(lora_id)
    indices = [0, 1, 2, 0, -1, 1]
    x = _randn(len(indices), HIDDEN, seed=23)
    plan = _plan(indices)
    for lora_a, lora_b in layers:
        lora_linear.add_lora_linear(plan, torch.zeros(len(indices), sum(SLICES)), x, lora_a, lora_b, 1.0, SLICES)
    kept = [dict(lora_a[0].__dict__[lora_linear._FUSED]["slots"]) for lora_a, _ in layers]
    assert not manager.activate_adapter(3)  # already in a slot: nothing written, nothing dropped
    for (lora_a, _), before in zip(layers, kept, strict=True):
        assert lora_a[0].__dict__[lora_linear._FUSED]["slots"] == before
    manager.deactivate(2)  # slot 1 is free again; adapter 4 goes there
    assert manager.activate_adapter(4)
    for (lora_a, lora_b), before in zip(layers, kept, strict=True):
        y = torch.zeros(len(indices), sum(SLICES))
        lora_linear.add_lora_linear(plan, y, x, lora_a, lora_b, 1.0, SLICES)
        torch.testing.assert_close(
            y.double(), reference(torch.zeros_like(y), x, lora_a, lora_b, 1.0, SLICES, indices), atol=1e-5, rtol=1e-5
        )
        slots = lora_a[0].__dict__[lora_linear._FUSED]["slots"]
        assert slots[0] is before[0] and slots[2] is before[2]  # not rebuilt
        assert slots[1] is not before[1]  # rebuilt from adapter 4's weights


def test_a_write_the_manager_did_not_announce_forgets_every_slot() -> None:
    lora_a, lora_b = _weights(SLICES, seed=24)
    manager_class = type("Manager", (_Manager,), {})
    lora_linear.track_slot_writes(manager_class)
    manager = manager_class([(lora_a, lora_b)])
    assert manager.activate_adapter(1) and manager.activate_adapter(2)
    indices = [0, 1]
    x = _randn(2, HIDDEN, seed=25)
    lora_linear.add_lora_linear(_plan(indices), torch.zeros(2, sum(SLICES)), x, lora_a, lora_b, 1.0, SLICES)
    lora_b[0][1, 0].mul_(2)  # some other code writes slot 1 ...
    manager.deactivate(1)
    assert manager.activate_adapter(3)  # ... before the manager writes slot 0
    y = torch.zeros(2, sum(SLICES))
    lora_linear.add_lora_linear(_plan(indices), y, x, lora_a, lora_b, 1.0, SLICES)
    torch.testing.assert_close(
        y.double(), reference(torch.zeros_like(y), x, lora_a, lora_b, 1.0, SLICES, indices), atol=1e-5, rtol=1e-5
    )


def test_weights_made_in_inference_mode_are_recomputed_every_call() -> None:
    indices = [0, 1]
    with torch.inference_mode():
        lora_a, lora_b = _weights(SLICES, seed=15)
    x = _randn(2, HIDDEN, seed=16)
    plan = _plan(indices)
    lora_linear.add_lora_linear(plan, torch.zeros(2, sum(SLICES)), x, lora_a, lora_b, 1.0, SLICES)
    with torch.inference_mode():
        lora_a[0][0].fill_(1.0)
    y = torch.zeros(2, sum(SLICES))
    lora_linear.add_lora_linear(plan, y, x, lora_a, lora_b, 1.0, SLICES)
    torch.testing.assert_close(
        y.double(), reference(torch.zeros_like(y), x, lora_a, lora_b, 1.0, SLICES, indices), atol=1e-5, rtol=1e-5
    )


def test_a_call_that_does_not_fit_the_plan_is_left_to_vllm() -> None:
    lora_a, lora_b = _weights(SLICES, seed=17)
    y = torch.zeros(3, sum(SLICES))
    assert not lora_linear.add_lora_linear(None, y, torch.ones(3, HIDDEN), lora_a, lora_b, 1.0, SLICES)
    assert not lora_linear.add_lora_linear(_plan([0, 1]), y, torch.ones(3, HIDDEN), lora_a, lora_b, 1.0, SLICES)
    assert not lora_linear.add_lora_linear(
        _plan([0, 1, 2]), y[:, :5], torch.ones(3, HIDDEN), lora_a, lora_b, 1.0, SLICES
    )
    assert torch.equal(y, torch.zeros_like(y))


# --- through vLLM's PunicaWrapperCPU --------------------------------------------------------------------------------


SLOT_IDS = [11, 12, 13, 14]


def _wrapper(punica_cpu: ModuleType, token_ids: list[int]) -> Any:
    wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=512, max_batches=512, device="cpu")
    mapping = SimpleNamespace(index_mapping=tuple(token_ids), prompt_mapping=tuple(token_ids), is_prefill=True)
    wrapper.update_metadata(mapping, SLOT_IDS, len(SLOT_IDS) + 1, 32)
    return wrapper


def test_apply_installs_the_planned_layers_once(punica_cpu: ModuleType) -> None:
    wrapper_class = punica_cpu.PunicaWrapperCPU
    assert lora_linear.installed(wrapper_class)
    method = wrapper_class.add_lora_linear
    lora_fix._applied = False
    lora_fix.apply()
    assert wrapper_class.add_lora_linear is method  # not wrapped twice
    manager = importlib.import_module(lora_fix.MODEL_MANAGER).LoRAModelManager
    # Two wrappers, each once: lora_slots' over this module's slot tracking, over vLLM's method.
    assert lora_slots.installed(manager)
    assert hasattr(manager.activate_adapter.__wrapped__, "__wrapped__")
    assert not hasattr(manager.activate_adapter.__wrapped__.__wrapped__, "__wrapped__")


@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_installed_wrapper_equals_vllms_wrapper_with_corrected_ops(punica_cpu: ModuleType, pattern: str) -> None:
    indices = PATTERNS[pattern]
    token_ids = [SLOT_IDS[slot] if slot >= 0 else 0 for slot in indices]
    wrapper = _wrapper(punica_cpu, token_ids)
    assert isinstance(wrapper.__dict__.get(lora_linear._PLAN), lora_linear.StepPlan)
    lora_a, lora_b = _weights(SLICES, seed=18)
    x = _randn(len(indices), HIDDEN, seed=19)
    y0 = _randn(len(indices), sum(SLICES), seed=20)
    planned, original = y0.clone(), y0.clone()
    wrapper.add_lora_linear(planned, x, lora_a, lora_b, 0.5, SLICES)
    wrapper.add_lora_linear.__wrapped__(wrapper, original, x, lora_a, lora_b, 0.5, SLICES)
    torch.testing.assert_close(planned, original, atol=1e-5, rtol=1e-5)


def test_a_new_step_is_planned_anew(punica_cpu: ModuleType) -> None:
    wrapper = _wrapper(punica_cpu, [11, 11, 0])
    first = wrapper.__dict__[lora_linear._PLAN]
    mapping = SimpleNamespace(index_mapping=(0, 12, 12, 12), prompt_mapping=(0, 12, 12, 12), is_prefill=True)
    wrapper.update_metadata(mapping, SLOT_IDS, len(SLOT_IDS) + 1, 32)
    second = wrapper.__dict__[lora_linear._PLAN]
    assert second is not first
    assert (second.tokens, second.runs) == (4, [(1, 4, 1)])


def test_the_self_check_fails_against_vllms_defective_ops(
    punica_cpu: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # vLLM's shipped ops give rows without an adapter the last slot's LoRA: the planned path must not match them.
    spec = importlib.util.find_spec(lora_fix.OPS_MODULE)
    assert spec is not None and spec.loader is not None
    shipped = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shipped)
    if lora_fix.probe("sgmv_shrink", shipped.sgmv_shrink) != "defective":
        pytest.skip("the installed vLLM's ops are already correct")
    for op in lora_fix.CORRECTED:
        monkeypatch.setattr(punica_cpu, op, getattr(shipped, op))
    wrapper_class = type("Unpatched", (punica_cpu.PunicaWrapperCPU,), {})
    wrapper_class.update_metadata = punica_cpu.PunicaWrapperCPU.update_metadata.__wrapped__  # type: ignore[method-assign]
    wrapper_class.add_lora_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear.__wrapped__  # type: ignore[method-assign]
    assert not lora_linear.check(wrapper_class)


def test_the_self_check_passes_the_corrected_wrapper(punica_cpu: ModuleType) -> None:
    wrapper_class = type("Unpatched", (punica_cpu.PunicaWrapperCPU,), {})
    wrapper_class.update_metadata = punica_cpu.PunicaWrapperCPU.update_metadata.__wrapped__  # type: ignore[method-assign]
    wrapper_class.add_lora_linear = punica_cpu.PunicaWrapperCPU.add_lora_linear.__wrapped__  # type: ignore[method-assign]
    assert lora_linear.check(wrapper_class)


def test_the_planned_layers_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("vllm")
    wrapper_class = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu").PunicaWrapperCPU
    monkeypatch.setattr(
        wrapper_class,
        "add_lora_linear",
        getattr(wrapper_class.add_lora_linear, "__wrapped__", wrapper_class.add_lora_linear),
    )
    monkeypatch.setattr(
        wrapper_class,
        "update_metadata",
        getattr(wrapper_class.update_metadata, "__wrapped__", wrapper_class.update_metadata),
    )
    monkeypatch.setenv(lora_fix.DISABLE_PLAN_ENV, "1")
    assert not lora_fix._plan_linear_layers()
    assert not lora_linear.installed(wrapper_class)
