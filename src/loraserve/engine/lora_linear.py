"""A decoder layer's LoRA in a few matrix products: ``add_lora_linear`` for vLLM's ``PunicaWrapperCPU``.

vLLM's CPU wrapper runs a linear layer's LoRA as one shrink and one expand op per slice (q, k and v are three),
each op re-slicing the step's metadata and allocating, and it does that for every module it can adapt, also when
the batch has no adapter row or the adapters leave the module alone: about 40 µs per decoder layer for a
base-only batch and 80 µs of bookkeeping per layer before any product. On a small model that is a large share
of a decode step. This replacement, installed by :func:`loraserve.engine.lora_fix.apply` next to the corrected ops:

- reads the step's LoRA slot per row once, when vLLM updates the wrapper's metadata (``update_metadata``), and
  plans the step then: rows without an adapter are skipped, rows that share a slot are computed together;
- keeps per layer, per slot, the slices' A matrices stacked (one shrink product for q, k and v) and their B
  matrices as one block-diagonal matrix (one expand product straight into the output), trimmed to the rank the
  adapter really has (vLLM pads every slot to ``--max-lora-rank``) and cast to the compute dtype once. Every
  in-place write bumps the stacked tensors' version counters, and a layer whose tensors moved on rebuilds every
  slot, unless the write was vLLM moving one adapter into one slot (``activate_adapter``): then only that slot;
- skips a layer outright when none of the step's slots touches it (a q/k/v/o adapter leaves gate/up/down zero);
- for a small step whose rows of several slots interleave (decode), multiplies every row by all the step's slots
  at once and zeroes the other slots' part of each row between the two products: two products in all instead of
  a gather, a scatter and a pair per slot, which on this CPU cost more than the extra multiply-adds.

Results equal vLLM's (with loraserve's corrected ops) up to float rounding: each row reads only its own slot,
and a row without an adapter is never touched. bf16/fp16 outputs are computed in float32 and rounded once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger("loraserve.lora_fix")

_PLAN = "_loraserve_plan"
_FUSED = "_loraserve_fused"
# Per-slice expands instead of one block-diagonal product when a run has this many rows: the block-diagonal
# product multiplies zeros (slices - 1) times over, which only pays while the call count dominates.
_LONG_RUN = 32
# The masked path (every row times every slot of the step) while rows x the slots' total rank is at most this:
# measured on q/k/v and o shapes (hidden 576, rank 8, 2 to 4 slots), it wins below and loses above.
_DENSE_ROW_RANKS = 4096
# Slot sets whose stacked matrices a layer keeps for the masked path: decode steps repeat one set for a while, and
# each set kept is one more copy of its slots' matrices (restacking costs about one step's LoRA products).
_DENSE_SETS = 1


class StepPlan:
    """Which rows of this step's batch go through which LoRA slot (-1: none)."""

    __slots__ = ("_indices", "_masks", "_rows", "grouped", "runs", "slots", "tokens")

    def __init__(self, indices: Sequence[int]) -> None:
        self.tokens = len(indices)
        self._indices = indices
        self._rows: torch.Tensor | None = None  # the indices as a tensor, made once for every mask of the step
        self._masks: dict[tuple[tuple[int, int], ...], torch.Tensor] = {}
        runs: list[tuple[int, int, int]] = []  # (start, stop, slot) over consecutive rows with one slot
        for row, slot in enumerate(indices):
            if runs and runs[-1][2] == slot and runs[-1][1] == row:
                runs[-1] = (runs[-1][0], row + 1, slot)
            elif slot >= 0:
                runs.append((row, row + 1, slot))
        self.runs = runs
        self.slots = sorted({slot for _, _, slot in runs})
        # Many short runs (decode rows of several adapters interleaved): gather each slot's rows into one block
        # instead, a product pair per slot. (permutation of the adapter rows, [(slot, start, stop) in it]).
        self.grouped: tuple[torch.Tensor, list[tuple[int, int, int]]] | None = None
        if len(runs) > len(self.slots) + 1:
            order: list[int] = []
            blocks: list[tuple[int, int, int]] = []
            for slot in self.slots:
                start = len(order)
                order.extend(row for row, value in enumerate(indices) if value == slot)
                blocks.append((slot, start, len(order)))
            self.grouped = (torch.tensor(order, dtype=torch.long), blocks)

    def other_slots_mask(self, widths: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """(tokens, sum of widths) True where a column belongs to another slot than the row's (or the row has none),
        for columns laid out slot after slot as ``widths`` ((slot, width), ...) says; one per layout and step."""
        mask = self._masks.get(widths)
        if mask is None:
            if self._rows is None:
                self._rows = torch.tensor(self._indices, dtype=torch.long)
            rows = self._rows
            columns = torch.repeat_interleave(
                torch.tensor([slot for slot, _ in widths], dtype=torch.long),
                torch.tensor([width for _, width in widths], dtype=torch.long),
            )
            mask = self._masks[widths] = rows[:, None] != columns[None, :]
        return mask


class _SlotMatrices:
    """One slot's LoRA for one layer: stacked A (rank total, in) and block-diagonal B (out total, rank total)."""

    __slots__ = ("a", "b", "slices")

    def __init__(self, a: torch.Tensor, b: torch.Tensor, slices: list[tuple[int, int, int, int]]) -> None:
        self.a = a
        self.b = b
        self.slices = slices  # per non-empty slice: (rank start, rank stop, out start, out stop)


def slot_matrix(stacked: torch.Tensor, slot: int) -> torch.Tensor:
    """One slot's (rows, cols) matrix: vLLM stacks them (slots, 1, rows, cols); (slots, rows, cols) works too."""
    return stacked[slot, 0] if stacked.dim() == 4 else stacked[slot]


def compute_dtype(output: torch.dtype) -> torch.dtype:
    """The dtype LoRA products are computed in: float32 for half-precision outputs (rounded once, into the output;
    without AVX-512 a bf16 matrix product is also 2-4x slower), else the output's own."""
    return torch.float32 if output in (torch.bfloat16, torch.float16) else output


def _used_rank(a: torch.Tensor, b: torch.Tensor) -> int:
    """How many leading rank rows carry the adapter: vLLM pads every slot to the maximum rank with zeros."""
    # Two reductions and one list: this runs for every slice of every layer each time vLLM moves an adapter into
    # a slot, and comparing to zero first (ne) then nonzero() took twice as long (26-38 us against 14-21).
    live = (a.any(dim=1) & b.any(dim=0)).tolist()
    for index in range(len(live) - 1, -1, -1):
        if live[index]:
            return index + 1
    return 0


def _slot_matrices(
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    output_slices: Sequence[int],
    slot: int,
    dtype: torch.dtype,
) -> _SlotMatrices | None:
    """The slot's fused matrices, or None when the slot leaves every slice of this layer alone."""
    parts_a: list[torch.Tensor] = []
    parts_b: list[tuple[int, int, torch.Tensor]] = []
    slices: list[tuple[int, int, int, int]] = []
    rank_at, out_at = 0, 0
    for stacked_a, stacked_b, size in zip(lora_a, lora_b, output_slices, strict=True):
        a, b = slot_matrix(stacked_a, slot), slot_matrix(stacked_b, slot)
        b = b[: min(size, b.shape[0])]  # adapter and model may pad output widths differently: common rows only
        rank = _used_rank(a, b)
        if rank:
            parts_a.append(a[:rank])
            parts_b.append((out_at, rank_at, b[:, :rank]))
            slices.append((rank_at, rank_at + rank, out_at, out_at + b.shape[0]))
            rank_at += rank
        out_at += size
    if not rank_at:
        return None
    fused_a = torch.cat(parts_a).to(dtype=dtype).contiguous()
    fused_b = torch.zeros(out_at, rank_at, dtype=dtype)
    for out_start, rank_start, b in parts_b:
        fused_b[out_start : out_start + b.shape[0], rank_start : rank_start + b.shape[1]] = b
    return _SlotMatrices(fused_a, fused_b, slices)


class _Stacked:
    """Several slots' matrices of one layer side by side: a (ranks, in), b (out total, ranks); ``widths`` says
    which slot owns which rank columns, in order."""

    __slots__ = ("a", "b", "widths")

    def __init__(self, present: dict[int, _SlotMatrices]) -> None:
        self.a = torch.cat([matrices.a for matrices in present.values()])
        self.b = torch.cat([matrices.b for matrices in present.values()], dim=1)
        self.widths = tuple((slot, matrices.a.shape[0]) for slot, matrices in present.items())


def _versions(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor]) -> tuple[int, ...] | None:
    try:
        return tuple(tensor._version for tensor in (*lora_a, *lora_b))
    except RuntimeError:  # inference tensors keep no version counter: nothing can be remembered
        return None


def _layer_memo(lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], dtype: torch.dtype) -> dict[str, Any]:
    """The layer's fused matrices per slot ("slots") and per slot set ("stacked"), remembered on its first A tensor
    until vLLM next writes any of them."""
    versions = _versions(lora_a, lora_b)
    if versions is None:
        return {"slots": {}, "stacked": {}}
    memo: dict[str, Any] = lora_a[0].__dict__.setdefault(_FUSED, {})
    if memo.get("versions") != versions or memo.get("dtype") != dtype:
        memo.update(versions=versions, dtype=dtype, slots={}, stacked={})
    return memo


def _stacked_slots(memo: dict[str, Any], present: dict[int, _SlotMatrices]) -> _Stacked:
    stacked: dict[tuple[int, ...], _Stacked] = memo["stacked"]
    key = tuple(present)
    if key not in stacked:
        while len(stacked) >= _DENSE_SETS:
            stacked.pop(next(iter(stacked)))  # the oldest set
        stacked[key] = _Stacked(present)
    return stacked[key]


def slot_written(
    lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], slot: int, versions_before: tuple[int, ...] | None
) -> None:
    """vLLM wrote ``slot`` of this layer, and nothing else since the tensors were at ``versions_before``.

    Only that slot's matrices are dropped; the others stay valid. Without this, every write (one per adapter
    moved into a slot) made every slot of every layer be rebuilt, ~0.1 ms each: 15 % of a decode loop that
    cycles 8 adapters through 4 slots. Any write this hook did not see leaves the versions apart, and
    :func:`_layer_memo` then forgets every slot, as before.
    """
    memo: dict[str, Any] | None = lora_a[0].__dict__.get(_FUSED)
    if not memo or versions_before is None or memo.get("versions") != versions_before:
        return
    memo["slots"].pop(slot, None)
    stacked = memo["stacked"]
    for key in [key for key in stacked if slot in key]:
        del stacked[key]
    memo["versions"] = _versions(lora_a, lora_b)


def _stacked(module: Any) -> tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]] | None:
    lora_a, lora_b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
    if isinstance(lora_a, tuple | list) and isinstance(lora_b, tuple | list) and lora_a and lora_b:
        if all(isinstance(t, torch.Tensor) for t in (*lora_a, *lora_b)):
            return lora_a, lora_b
    return None


def track_slot_writes(manager_class: Any) -> None:
    """Tell the layers which slot vLLM's ``LoRAModelManager.activate_adapter`` writes (one: the adapter's)."""
    original = manager_class.activate_adapter
    if hasattr(original, "__wrapped__"):
        return

    def activate_adapter(self: Any, lora_id: int) -> bool:
        if lora_id in getattr(self, "_active_adapters", ()):
            # vLLM calls this for every adapter of every step; an active one is not written: skip the scan.
            result: bool = original(self, lora_id)
            return result
        layers = [stacked for module in self.modules.values() if (stacked := _stacked(module)) is not None]
        before = [_versions(lora_a, lora_b) for lora_a, lora_b in layers]
        result = original(self, lora_id)
        if result and lora_id in self.lora_index_to_id:
            slot = self.lora_index_to_id.index(lora_id)
            for (lora_a, lora_b), versions in zip(layers, before, strict=True):
                slot_written(lora_a, lora_b, slot, versions)
        return result

    activate_adapter.__wrapped__ = original  # type: ignore[attr-defined]
    manager_class.activate_adapter = activate_adapter


def _add(target: torch.Tensor, h: torch.Tensor, matrices: _SlotMatrices) -> None:
    """``target += h @ B.T`` (``target`` has ``h``'s dtype)."""
    if len(matrices.slices) > 1 and h.shape[0] >= _LONG_RUN:
        for rank_start, rank_stop, out_start, out_stop in matrices.slices:
            weights = matrices.b[out_start:out_stop, rank_start:rank_stop]
            target[:, out_start:out_stop].addmm_(h[:, rank_start:rank_stop], weights.t())
        return
    columns = matrices.b.shape[0]
    (target if columns == target.shape[1] else target[:, :columns]).addmm_(h, matrices.b.t())


def add_lora_linear(
    plan: StepPlan | None,
    y: torch.Tensor,
    x: torch.Tensor,
    lora_a_stacked: Sequence[torch.Tensor],
    lora_b_stacked: Sequence[torch.Tensor],
    scale: float,
    output_slices: Sequence[int],
) -> bool:
    """``y[row] += scale * x[row] @ A[slot].T @ B[slot].T`` for each row with a slot, every slice at once.

    False (and ``y`` untouched) for a call the plan does not fit: the caller then runs vLLM's own code.
    """
    if plan is None or x.shape[0] != plan.tokens or y.dim() != 2 or y.shape[0] != plan.tokens:
        return False
    if sum(output_slices) > y.shape[1] or len(lora_a_stacked) != len(lora_b_stacked):
        return False
    if not plan.runs:
        return True
    dtype = compute_dtype(y.dtype)
    memo = _layer_memo(lora_a_stacked, lora_b_stacked, dtype)
    slots: dict[int, _SlotMatrices | None] = memo["slots"]
    present: dict[int, _SlotMatrices] = {}
    for slot in plan.slots:
        if slot not in slots:
            slots[slot] = _slot_matrices(lora_a_stacked, lora_b_stacked, output_slices, slot, dtype)
        if (matrices := slots[slot]) is not None:
            present[slot] = matrices
    if not present:  # no slot of this step touches this layer
        return True
    x = x.to(dtype=dtype)
    if plan.grouped is not None and plan.tokens * sum(m.a.shape[0] for m in present.values()) <= _DENSE_ROW_RANKS:
        _add_masked(plan, y, x, _stacked_slots(memo, present), scale, dtype)
        return True
    if plan.grouped is None:
        for start, stop, slot in plan.runs:
            if (matrices := present.get(slot)) is None:
                continue
            h = x[start:stop] @ matrices.a.t()
            if scale != 1.0:
                h.mul_(scale)
            if y.dtype == dtype:
                _add(y[start:stop], h, matrices)
            else:  # the float32 sum rounded once (vLLM's ops round the product and then the sum)
                rows = y[start:stop].to(dtype)
                _add(rows, h, matrices)
                y[start:stop] = rows
        return True
    order, blocks = plan.grouped
    gathered = x.index_select(0, order)
    delta = torch.zeros(gathered.shape[0], y.shape[1], dtype=dtype)
    for slot, start, stop in blocks:
        if (matrices := present.get(slot)) is None:
            continue
        h = gathered[start:stop] @ matrices.a.t()
        if scale != 1.0:
            h.mul_(scale)
        _add(delta[start:stop], h, matrices)
    if y.dtype == dtype:
        y.index_add_(0, order, delta)
    else:
        y.index_copy_(0, order, y.index_select(0, order).to(dtype).add_(delta).to(y.dtype))
    return True


def _add_masked(
    plan: StepPlan, y: torch.Tensor, x: torch.Tensor, stacked: _Stacked, scale: float, dtype: torch.dtype
) -> None:
    """Every row through every slot of ``stacked``, the other slots' rank columns zeroed between the products: a
    row without an adapter gets exactly zero added. ``masked_fill_``, not a multiply: 0 x inf would be NaN."""
    h = x @ stacked.a.t()
    h.masked_fill_(plan.other_slots_mask(stacked.widths), 0.0)
    if scale != 1.0:
        h.mul_(scale)
    columns = stacked.b.shape[0]
    if y.dtype == dtype:
        y[:, :columns].addmm_(h, stacked.b.t())
    else:  # the float32 sum rounded once; a row without an adapter goes there and back unchanged
        y[:, :columns] = y[:, :columns].to(dtype).addmm_(h, stacked.b.t())


def plan_step(wrapper: Any) -> None:
    """Plan the step vLLM just wrote into the wrapper's metadata (called after its ``update_metadata``)."""
    indices: list[int] = wrapper.token_lora_indices.tolist()
    wrapper.__dict__[_PLAN] = StepPlan(indices)


def installed(wrapper_class: Any) -> bool:
    return hasattr(wrapper_class.add_lora_linear, "__wrapped__")


def install(wrapper_class: Any) -> None:
    """Give ``wrapper_class`` (vLLM's ``PunicaWrapperCPU``) the planned ``update_metadata`` and ``add_lora_linear``."""
    original_update = wrapper_class.update_metadata
    original_linear = wrapper_class.add_lora_linear

    def update_metadata(self: Any, *args: Any, **kwargs: Any) -> None:
        self.__dict__.pop(_PLAN, None)  # never a stale plan, even if planning below fails
        original_update(self, *args, **kwargs)
        plan_step(self)

    def planned_add_lora_linear(
        self: Any,
        y: torch.Tensor,
        x: torch.Tensor,
        lora_a_stacked: tuple[torch.Tensor, ...],
        lora_b_stacked: tuple[torch.Tensor, ...],
        scale: float,
        output_slices: tuple[int, ...],
        **kwargs: Any,
    ) -> None:
        plan = self.__dict__.get(_PLAN)
        if not add_lora_linear(plan, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices):
            original_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, **kwargs)

    update_metadata.__wrapped__ = original_update  # type: ignore[attr-defined]
    planned_add_lora_linear.__wrapped__ = original_linear  # type: ignore[attr-defined]
    wrapper_class.update_metadata = update_metadata
    wrapper_class.add_lora_linear = planned_add_lora_linear


# The self-check run before installing: vLLM's wrapper (with whatever ops it calls) and the planned path on one
# mixed batch: rows of three slots interleaved and without an adapter, one slot zero for the layer, one with a
# smaller rank than the others, q/k/v-like slices and a single slice, float32 and bfloat16.


def _check_case(wrapper_class: Any, index_mapping: Sequence[int], dtype: torch.dtype, slices: Sequence[int]) -> bool:
    from vllm.lora.layers import LoRAMapping

    gen = torch.Generator().manual_seed(len(index_mapping))
    tokens, hidden, rank, slots = len(index_mapping), 8, 4, 4
    wrapper = wrapper_class(max_num_batched_tokens=32, max_batches=32, device="cpu")
    mapping = LoRAMapping(tuple(index_mapping), tuple(index_mapping), is_prefill=True)
    wrapper.update_metadata(mapping, [1, 2, 3, None], slots, 32)
    plan_step(wrapper)
    lora_a = tuple(torch.randn(slots, 1, rank, hidden, generator=gen).to(dtype) for _ in slices)
    lora_b = tuple(torch.randn(slots, 1, size, rank, generator=gen).to(dtype) for size in slices)
    for a, b in zip(lora_a, lora_b, strict=True):
        a[1, 0, 2:] = 0  # slot 1: rank 2 of 4
        b[1, 0, :, 2:] = 0
        a[2] = 0  # slot 2: an adapter that leaves this layer alone
        b[2] = 0
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    y = torch.randn(tokens, sum(slices), generator=gen).to(dtype)
    expected, actual = y.clone(), y.clone()
    wrapper_class.add_lora_linear(wrapper, expected, x, lora_a, lora_b, 0.5, tuple(slices))
    if not add_lora_linear(wrapper.__dict__[_PLAN], actual, x, lora_a, lora_b, 0.5, tuple(slices)):
        return False
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    return torch.allclose(actual.float(), expected.float(), atol=tolerance, rtol=tolerance)


def check(wrapper_class: Any) -> bool:
    """Whether the planned path gives what ``wrapper_class.add_lora_linear`` gives, on a few mixed batches."""
    mappings = [(1, 1, 0, 2, 2, 1, 0, 2, 3, 3, 1, 2), (1, 1, 1, 0, 0, 2, 2), (0, 0, 0), (3, 3)]
    try:
        return all(
            _check_case(wrapper_class, mapping, dtype, slices)
            for mapping in mappings
            for dtype in (torch.float32, torch.bfloat16)
            for slices in ((6, 4, 4), (5,))
        )
    except Exception:  # a wrapper or mapping this module does not know: keep vLLM's
        logger.debug("Could not check the planned add_lora_linear against vLLM's", exc_info=True)
        return False
