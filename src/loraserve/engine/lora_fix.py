"""Correct vLLM's CPU LoRA ops for base-model rows batched with adapter rows (vLLM #48421, #49656).

vLLM marks a row without an adapter with LoRA index -1. The PyTorch ops that ``PunicaWrapperCPU`` calls
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``weights[indices]`` unmasked, so -1 wraps around to the last
LoRA slot: a base-model request that shares a batch with adapter requests is computed through whichever adapter
sits in slot ``max_loras - 1``. Alone it is right, because the prefill path skips LoRA when no row has an adapter.

:func:`apply` is registered as a ``vllm.general_plugins`` entry point, so vLLM calls it in every process it starts
(API process, EngineCore, workers). It probes each op on tiny tensors and replaces only those that really read a
slot for -1, with versions that gather a valid slot and zero the rows without an adapter (as the GPU kernels do by
skipping them). On a vLLM that is already fixed, or a platform whose LoRA path does not use these ops, it does
nothing. Then, on CPU, it gives ``PunicaWrapperCPU`` loraserve's planned ``add_lora_linear``
(:mod:`loraserve.engine.lora_linear`) once that has matched the wrapper on a mixed batch, and vLLM's adapter
activation stops zeroing slots that are zero already (:mod:`loraserve.engine.lora_slots`).
``LORASERVE_DISABLE_LORA_FIX=1`` switches all of it off; ``LORASERVE_DISABLE_LORA_PLAN=1`` only the planned layers.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import torch

from loraserve.engine import lora_linear, lora_slots
from loraserve.logs import in_main_process

logger = logging.getLogger("loraserve.lora_fix")

DISABLE_ENV = "LORASERVE_DISABLE_LORA_FIX"  # every change below off: vLLM's ops and wrapper as they ship
DISABLE_PLAN_ENV = "LORASERVE_DISABLE_LORA_PLAN"  # only the planned linear layers off (lora_linear.py)
OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
MODEL_MANAGER = "vllm.lora.model_manager"

Verdict = Literal["defective", "fine", "unknown"]

_applied = False


# Corrected ops: same signatures and results as vLLM 0.32.0's, except that rows whose index is -1 get no LoRA.
#
# They are also fast. vLLM's ops gather a (out, in) matrix per row (``weights[indices]``: a copy of out x in values
# per token) and run one tiny matrix-vector product per row (einsum -> bmm), ten-odd torch calls per op and 240 op
# calls per decode step for a q/k/v/o adapter on a 30-layer model. Here rows that share a LoRA slot are computed
# together (Punica/S-LoRA's grouping) and written straight into the output:
#
# - runs: consecutive rows with one slot (vLLM's sgmv metadata gives them; for bgmv they are read off the indices)
#   are one matrix product each with the slot's matrix. When every row has one slot (decode with one adapter) that
#   is a single product; a run without an adapter (-1) is skipped when adding and zeroed when writing.
# - all slots: many short runs (a decode batch over several adapters) are one product of every row with every
#   slot's matrix at once (the stacked weights viewed as one (slots x out, in) matrix: no copy), then each row takes
#   its own slot's columns and rows without an adapter are zeroed. Each output value still reads one slot only, so
#   one adapter's weights never reach another adapter's row or a base row.
#
# Products are computed in the output's dtype, as vLLM's ops do, except that bf16/fp16 outputs get a float32 product
# rounded once (vLLM's round twice); the results equal theirs up to float rounding.
#
# vLLM gives every module it can adapt (q/k/v, o, gate/up, down on Llama) a LoRA layer, and a slot whose adapter
# does not touch that module holds zeros (``reset_lora``); those products are skipped. Whether a slot is zero, and
# the slot's matrix cast to float32 (bf16 models), are remembered on the weights tensor with
# its version counter, which every in-place write (vLLM's ``copy_`` into a slot, ``reset_lora``'s assignment)
# bumps: a slot is looked at again after each write.

_Runs = list[tuple[slice, int]]
_ALL = slice(None)


def _runs(slots: list[int], lengths: list[int]) -> _Runs:
    runs: _Runs = []
    start = 0
    for slot, length in zip(slots, lengths, strict=True):
        if runs and runs[-1][1] == slot:  # merge neighbours with one slot
            runs[-1] = (slice(runs[-1][0].start, start + length), slot)
        elif length:
            runs.append((slice(start, start + length), slot))
        start += length
    return runs


def _few(runs: _Runs, tokens: int) -> bool:
    # A product per run while runs are few or long; else one product over all slots (slots x the work, one call).
    return len(runs) <= max(2, tokens // 64)


class _Plan:
    """How to compute a batch: ``runs`` of rows with one slot each, or else per-row ``slots`` (a LongTensor)."""

    __slots__ = ("runs", "slots", "used")

    def __init__(self, runs: _Runs | None, slots: torch.Tensor | None = None, used: set[int] | None = None) -> None:
        self.runs = runs
        self.slots = slots
        self.used = used or set()  # the slots ``slots`` holds, -1 included

    @property
    def base_rows(self) -> bool:
        return -1 in self.used


def _token_plan(indices: torch.Tensor) -> _Plan:
    values: list[int] = indices.tolist()
    if not values or values.count(values[0]) == len(values):
        return _Plan([(_ALL, values[0])] if values else [])
    slots: list[int] = []
    lengths: list[int] = []
    for value in values:
        if slots and slots[-1] == value:
            lengths[-1] += 1
        else:
            slots.append(value)
            lengths.append(1)
    runs = _runs(slots, lengths)
    return _Plan(runs) if _few(runs, len(values)) else _Plan(None, indices, set(slots))


def _segment_plan(lora_indices: torch.Tensor, seq_lens: torch.Tensor, batches: int) -> _Plan:
    # One index per segment of consecutive tokens; vLLM's compute_meta already merges neighbours with one index.
    slots: list[int] = lora_indices.tolist()
    if batches == 1 or slots.count(slots[0]) == len(slots):
        return _Plan([(_ALL, slots[0])])
    lengths: list[int] = seq_lens.tolist()
    runs = _runs(slots, lengths)
    if _few(runs, sum(lengths)):
        return _Plan(runs)
    return _Plan(None, torch.repeat_interleave(lora_indices, seq_lens), set(slots))


_REMEMBERED = "_loraserve_remembered"
_Value = TypeVar("_Value")


def _remember(weights: torch.Tensor, key: tuple[Any, ...], compute: Callable[[], _Value]) -> _Value:
    """``compute()``, remembered on ``weights`` until the tensor is next written in place (its version changes)."""
    try:
        version = weights._version
    except RuntimeError:  # an inference tensor keeps no version counter: nothing is remembered
        return compute()
    known: dict[tuple[Any, ...], tuple[int, Any]] = weights.__dict__.setdefault(_REMEMBERED, {})
    seen = known.get(key)
    if seen is None or seen[0] != version:
        seen = known[key] = (version, compute())
    value: _Value = seen[1]
    return value


def _zero(weights: torch.Tensor, slot: int) -> bool:
    """Whether the slot holds only zeros (a module the slot's adapter leaves alone)."""
    return _remember(weights, ("zero", slot), lambda: not bool(weights[slot].any()))


def _transposed(weights: torch.Tensor, slot: int, dtype: torch.dtype) -> torch.Tensor:
    """The slot's (in, out) matrix in ``dtype``; a cast (bf16 weights to float32) is made once per write."""
    matrix = lora_linear.slot_matrix(weights, slot)
    if matrix.dtype == dtype:
        return matrix.t()
    return _remember(weights, ("cast", slot, dtype), lambda: matrix.to(dtype=dtype).t())


def _lora(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    target: torch.Tensor,
    plan: _Plan,
    add: bool,
    scaling: float = 1.0,
) -> None:
    """``target[row] (+)= scaling * inputs[row] @ weights[slot(row)].T`` for every row; -1 rows: no LoRA.

    A row without an adapter is left alone when adding and zeroed when writing. ``target`` may be a column slice of
    the output; its width must be the weights' output width.
    """
    # vLLM rounds the product to the output's dtype and then the sum; here only the sum.
    dtype = lora_linear.compute_dtype(target.dtype)
    if plan.runs is not None:
        x: torch.Tensor | None = None
        for rows, slot in plan.runs:
            part = target if rows is _ALL else target[rows]
            if slot < 0 or _zero(weights, slot):  # no adapter, or one that leaves this module alone
                if not add:
                    part.zero_()
                continue
            if x is None:
                x = inputs.to(dtype=dtype)
            x_rows = x if rows is _ALL else x[rows]
            matrix = _transposed(weights, slot, dtype)
            if scaling == 1.0 and part.dtype == dtype and part.is_contiguous():  # straight into the output
                if add:
                    part.addmm_(x_rows, matrix)
                else:
                    torch.mm(x_rows, matrix, out=part)
                continue
            _deposit(part, torch.mm(x_rows, matrix), scaling, add)
        return
    assert plan.slots is not None
    if all(slot < 0 or _zero(weights, slot) for slot in plan.used):
        if not add:
            target.zero_()
        return
    x = inputs.to(dtype=dtype)
    slots, width = weights.shape[0], weights.shape[-2]
    stacked = weights.reshape(slots * width, weights.shape[-1])  # a view of vLLM's contiguous stack, no copy
    if stacked.dtype != dtype:
        stacked = _remember(weights, ("cast", None, dtype), lambda: stacked.to(dtype=dtype))
    every = torch.nn.functional.linear(x, stacked)
    result = every.view(x.shape[0], slots, width)[torch.arange(x.shape[0]), plan.slots.clamp(min=0)]
    if plan.base_rows:
        # masked_fill rather than a multiply: a base row is exactly 0 whatever the slot it read holds.
        result.masked_fill_((plan.slots < 0).unsqueeze(1), 0)
    _deposit(target, result, scaling, add)


def _deposit(target: torch.Tensor, result: torch.Tensor, scaling: float, add: bool) -> None:
    """Scale a computed product (in place: it is a temporary) and add it to, or write it into, the output."""
    if scaling != 1.0:
        result.mul_(scaling)
    if add:
        target.add_(result)
    else:
        target.copy_(result)


def _columns(output: torch.Tensor, start: int, width: int) -> torch.Tensor:
    return output if start == 0 and width == output.shape[1] else output.narrow(1, start, width)


def _shrink(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: _Plan, scaling: float) -> None:
    _lora(inputs, weights, _columns(output, 0, weights.shape[-2]), plan, add=False, scaling=scaling)


def _expand(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor, plan: _Plan, add: bool) -> None:
    width = weights.shape[-2]
    common_len = min(width, output.shape[1])
    if inputs.shape[0] == output.shape[0]:
        # Adapter and model may pad their widths differently: only the common columns.
        narrowed = weights if common_len == width else weights[..., :common_len, :]
        _lora(inputs, narrowed, _columns(output, 0, common_len), plan, add=add)
        return
    # As in vLLM: one input row broadcasts over every output row (else the first output rows are used).
    outputs = torch.zeros(inputs.shape[0], width, dtype=output.dtype)
    _lora(inputs, weights, outputs, plan, add=True)
    limit = 1 if outputs.shape[0] == 1 and output.shape[0] != 1 else output.shape[0]
    if add:
        output[:, :common_len] += outputs[:limit, :common_len]
    else:
        output[:, :common_len] = outputs[:limit, :common_len]


def _expand_slice(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    plan: _Plan,
    slice_offset: int,
    slice_size: int,
    add: bool,
) -> None:
    _lora(inputs, weights, _columns(output, slice_offset, slice_size), plan, add=add)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    _shrink(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), scaling)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    _expand(inputs, lora_b_weights, output_tensor, _token_plan(lora_indices_tensor), add_inputs)


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    plan = _token_plan(lora_indices_tensor)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


# The sgmv (prefill) ops take one index per segment of consecutive tokens: the runs, given.


def sgmv_shrink(
    inputs: torch.Tensor,
    lora_a_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    scaling: float,
) -> None:
    plan = _segment_plan(lora_indices_tensor, seq_len_tensor, batches)
    _shrink(inputs, lora_a_weights, output_tensor, plan, scaling)


def sgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    add_inputs: bool = False,
) -> None:
    plan = _segment_plan(lora_indices_tensor, seq_len_tensor, batches)
    _expand(inputs, lora_b_weights, output_tensor, plan, add_inputs)


def sgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    b_seq_start_loc: torch.Tensor,
    seq_len_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    batches: int,
    max_seq_length: int,
    token_nums: int,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = False,
) -> None:
    plan = _segment_plan(lora_indices_tensor, seq_len_tensor, batches)
    _expand_slice(inputs, lora_b_weights, output_tensor, plan, slice_offset, slice_size, add_inputs)


CORRECTED: dict[str, Callable[..., None]] = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


# Detection: run an op on two rows, one without an adapter (-1) and one with slot 0, with every slot non-zero.
# A correct op leaves the -1 row at zero (shrink) or untouched (expand) and computes the slot-0 row.


def probe(name: str, op: Callable[..., Any]) -> Verdict:
    """Whether ``op`` (vLLM's op called ``name``) reads a LoRA slot for index -1."""
    gen = torch.Generator().manual_seed(0)
    slots, hidden, rank, width = 2, 6, 3, 8
    indices = torch.tensor([-1, 0])
    seq = (torch.tensor([0, 1]), torch.tensor([1, 1]), indices, 2, 1, 2)  # sgmv: one token per sequence
    try:
        if name.endswith("shrink"):
            x = torch.randn(2, hidden, generator=gen)
            weights = torch.randn(slots, 1, rank, hidden, generator=gen) + 2
            out = torch.zeros(2, rank)
            op(x, weights, out, *(seq if name.startswith("sgmv") else (indices,)), 1.0)
            expected = torch.stack([torch.zeros(rank), weights[0, 0] @ x[1]])
        else:
            x = torch.randn(2, rank, generator=gen)
            size = width if name.endswith("expand") else width // 2
            weights = torch.randn(slots, 1, size, rank, generator=gen) + 2
            out = torch.randn(2, width, generator=gen)
            expected = out.clone()
            expected[1, :size] += weights[0, 0] @ x[1]
            slice_args = () if name.endswith("expand") else (0, size)
            op(x, weights, out, *(seq if name.startswith("sgmv") else (indices,)), *slice_args, True)
    except Exception:  # a signature or layout this module does not know: leave the op alone
        logger.debug("Could not probe vLLM's %s", name, exc_info=True)
        return "unknown"
    if not torch.allclose(out[1], expected[1], atol=1e-4):
        return "unknown"  # the row with an adapter is wrong too: not the defect this module corrects
    return "fine" if torch.allclose(out[0], expected[0], atol=1e-4) else "defective"


def _uses_torch_ops() -> bool:
    # Only PunicaWrapperCPU calls the torch ops; GPU builds use Triton kernels that already skip -1.
    try:
        from vllm.platforms import current_platform

        return bool(current_platform.get_punica_wrapper() == CPU_WRAPPER)
    except Exception:
        logger.debug("Could not tell which LoRA ops this platform uses", exc_info=True)
        return False


def _ops_module() -> Any:
    return importlib.import_module(OPS_MODULE)


def _replace(original: Callable[..., Any], corrected: Callable[..., None], name: str) -> list[str]:
    # punica_cpu and the torch_ops package bind the ops by name at import, so rebind every vLLM module that holds
    # the original (vars(), not getattr, so lazy module __getattr__ hooks never run). Modules imported later
    # get the corrected op from the patched package.
    patched = []
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("vllm") and module is not None and vars(module).get(name) is original:
            setattr(module, name, corrected)
            patched.append(module_name)
    return patched


def apply() -> list[str]:
    """Correct the defective CPU LoRA ops in this process; return the names of the ops replaced. Idempotent."""
    global _applied
    if _applied:
        return []
    _applied = True
    try:
        return _apply()
    except Exception:  # a plugin that raises stops vLLM from starting; a missing correction must not
        logger.warning("Could not check vLLM's CPU LoRA ops for the mixed-batch defect (vLLM #48421)", exc_info=True)
        return []


def _apply() -> list[str]:
    if not _uses_torch_ops():
        return []
    ops = _ops_module()
    # Probe everything before patching anything: the sgmv ops call the bgmv ops through the module.
    originals = {name: op for name in CORRECTED if (op := getattr(ops, name, None)) is not None}
    verdicts = {name: probe(name, op) for name, op in originals.items()}
    unchecked = [name for name in CORRECTED if verdicts.get(name, "unknown") == "unknown"]
    if unchecked:
        logger.warning("vLLM's CPU LoRA ops changed; could not check %s for the -1 defect", ", ".join(unchecked))
    defective = [name for name, verdict in verdicts.items() if verdict == "defective"]
    if os.environ.get(DISABLE_ENV) == "1":
        if defective:
            logger.warning(
                "vLLM's CPU LoRA ops (%s) give base-model requests batched with adapter requests the last adapter's "
                "weights; the correction is switched off by %s=1",
                ", ".join(defective),
                DISABLE_ENV,
            )
        return []
    if defective:
        for name in defective:
            logger.debug("Replacing %s in %s", name, ", ".join(_replace(originals[name], CORRECTED[name], name)))
        # Once per server, not once per vLLM process: the others only say it at debug.
        log = logger.info if in_main_process() else logger.debug
        log(
            "vLLM's CPU LoRA ops compute base-model rows batched with adapter rows through the last adapter "
            "(vLLM #48421); loraserve's correction is active for %s (pid %d)",
            ", ".join(defective),
            os.getpid(),
        )
    else:
        logger.debug("vLLM's CPU LoRA ops handle rows without an adapter; no correction needed")
    _plan_linear_layers()  # after the correction: its self-check compares against the corrected wrapper
    try:
        lora_slots.skip_zero_resets(importlib.import_module(MODEL_MANAGER).LoRAModelManager)
    except Exception:  # without it vLLM zeroes slots that are zero already: slower, still right
        logger.debug("Could not follow which LoRA slots are zero", exc_info=True)
    return defective


def _wrapper_class() -> Any:
    module_name, _, class_name = CPU_WRAPPER.rpartition(".")
    wrapper_class: Any = getattr(importlib.import_module(module_name), class_name)
    return wrapper_class


def _plan_linear_layers() -> bool:
    """Install :mod:`loraserve.engine.lora_linear` on vLLM's CPU wrapper if it computes what the wrapper does."""
    if os.environ.get(DISABLE_PLAN_ENV) == "1":
        logger.debug("loraserve's planned LoRA linear layers are switched off by %s=1", DISABLE_PLAN_ENV)
        return False
    wrapper_class = _wrapper_class()
    if lora_linear.installed(wrapper_class):
        return False
    if not lora_linear.check(wrapper_class):
        logger.warning("vLLM's CPU LoRA wrapper changed; its linear layers keep vLLM's slower per-slice LoRA path")
        return False
    lora_linear.install(wrapper_class)
    try:
        lora_linear.track_slot_writes(importlib.import_module(MODEL_MANAGER).LoRAModelManager)
    except Exception:  # without it every slot write rebuilds every slot: slower, still right
        logger.debug("Could not follow vLLM's LoRA slot writes", exc_info=True)
    logger.debug("LoRA linear layers run loraserve's planned products (pid %d)", os.getpid())
    return True
