"""Correct vLLM's CPU LoRA ops for base-model rows batched with adapter rows (vLLM #48421, #49656).

vLLM marks a row without an adapter with LoRA index -1. The PyTorch ops that ``PunicaWrapperCPU`` calls
(``vllm/lora/ops/torch_ops/lora_ops.py``) gather ``weights[indices]`` unmasked, so -1 wraps around to the last
LoRA slot: a base-model request that shares a batch with adapter requests is computed through whichever adapter
sits in slot ``max_loras - 1``. Alone it is right, because the prefill path skips LoRA when no row has an adapter.

:func:`apply` is registered as a ``vllm.general_plugins`` entry point, so vLLM calls it in every process it starts
(API process, EngineCore, workers). It probes each op on tiny tensors and replaces only those that really read a
slot for -1, with versions that gather a valid slot and zero the rows without an adapter (as the GPU kernels do by
skipping them). On a vLLM that is already fixed, or a platform whose LoRA path does not use these ops, it does
nothing. ``LORASERVE_DISABLE_LORA_FIX=1`` switches it off.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, Literal

import torch

from loraserve.logs import in_main_process

logger = logging.getLogger("loraserve.lora_fix")

DISABLE_ENV = "LORASERVE_DISABLE_LORA_FIX"
OPS_MODULE = "vllm.lora.ops.torch_ops.lora_ops"
CPU_WRAPPER = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"

Verdict = Literal["defective", "fine", "unknown"]

_applied = False


# Corrected ops: same signatures and results as vLLM 0.32.0's, except that rows whose index is -1 get no LoRA.


def _select(weights: torch.Tensor, indices: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # Gather a valid slot for every row (clamp keeps -1 from wrapping to the last slot); _mask zeroes those rows.
    selected = weights[indices.clamp(min=0)].to(dtype=dtype)
    return selected.squeeze(dim=1) if selected.dim() == 4 else selected


def _mask(outputs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    # masked_fill rather than a multiply: a no-adapter row stays exactly 0 whatever the gathered slot holds.
    return outputs.masked_fill((indices < 0).unsqueeze(-1), 0)


def bgmv_shrink(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    scaling: float = 1.0,
) -> None:
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    output_tensor[:, : outputs.shape[1]] = scaling * _mask(outputs, lora_indices_tensor)


def bgmv_expand(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    add_inputs: bool = True,
) -> None:
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    outputs = _mask(outputs, lora_indices_tensor)
    # As in vLLM: one output row broadcasts; adapter and model may pad their widths differently.
    limit = 1 if outputs.shape[0] == 1 and output_tensor.shape[0] != 1 else output_tensor.shape[0]
    common_len = min(outputs.shape[1], output_tensor.shape[1])
    if add_inputs:
        output_tensor[:, :common_len] += outputs[:limit, :common_len]
    else:
        output_tensor[:, :common_len] = outputs[:limit, :common_len]


def bgmv_expand_slice(
    inputs: torch.Tensor,
    lora_b_weights: torch.Tensor,
    output_tensor: torch.Tensor,
    lora_indices_tensor: torch.Tensor,
    slice_offset: int,
    slice_size: int,
    add_inputs: bool = True,
) -> None:
    selected = _select(lora_b_weights, lora_indices_tensor, output_tensor.dtype)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=output_tensor.dtype), selected)
    outputs = _mask(outputs, lora_indices_tensor)
    if add_inputs:
        output_tensor[:, slice_offset : slice_offset + slice_size] += outputs
    else:
        output_tensor[:, slice_offset : slice_offset + slice_size] = outputs


# The sgmv (prefill) ops take one index per sequence; expanding it per token makes them the bgmv ops.


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
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_shrink(inputs, lora_a_weights, output_tensor, indices, scaling)


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
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand(inputs, lora_b_weights, output_tensor, indices, add_inputs)


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
    indices = torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, indices, slice_offset, slice_size, add_inputs)


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
    if not defective:
        logger.debug("vLLM's CPU LoRA ops handle rows without an adapter; no correction needed")
        return []
    if os.environ.get(DISABLE_ENV) == "1":
        logger.warning(
            "vLLM's CPU LoRA ops (%s) give base-model requests batched with adapter requests the last adapter's "
            "weights; the correction is switched off by %s=1",
            ", ".join(defective),
            DISABLE_ENV,
        )
        return []
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
    return defective
