"""loraserve's correction of vLLM's CPU LoRA ops: a row with LoRA index -1 (no adapter) gets no LoRA at all.

The corrected ops are checked against a plain per-row loop, the detection against a copy of the defective op and
the installed vLLM's own ops, and ``apply()`` through the ``PunicaWrapperCPU`` that vLLM runs on CPU. Run with
``LORASERVE_DISABLE_LORA_FIX=1`` the ``apply()`` tests fail, as the engine would without the correction.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from functools import partial
from types import ModuleType, SimpleNamespace
from typing import Any

import pytest
import torch

from loraserve.engine import lora_fix

SLOTS, HIDDEN, RANK, OUT = 3, 16, 4, 24
INDEX_CASES = {
    "mixed": [-1, 0, 1, -1, 2],
    "all-base": [-1, -1, -1],
    "no-base": [2, 0, 1, 1, 0],
    "one-base": [-1],
    "base-last": [0, 2, -1],
}
# sgmv: one index per sequence, sequences of these lengths (cycled).
SEQ_LENS = [2, 1, 3, 1, 2]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _weights(out: int, inp: int, seed: int) -> torch.Tensor:
    # Every slot non-zero (and the last one different from the others), so reading a slot for -1 shows.
    return _randn(SLOTS, 1, out, inp, seed=seed) + torch.arange(1, SLOTS + 1).view(SLOTS, 1, 1, 1)


def reference(x: torch.Tensor, weights: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """Row by row: zero for -1, else the row times its slot's (out, in) matrix."""
    rows = [torch.zeros(weights.shape[2]) if i < 0 else weights[i, 0] @ x[row] for row, i in enumerate(indices)]
    return torch.stack(rows)


def _segments(seq_indices: list[int]) -> tuple[list[int], tuple[Any, ...]]:
    """Token indices and the sgmv metadata (start locs, lengths, indices, batches, max length, tokens)."""
    lens = [SEQ_LENS[i % len(SEQ_LENS)] for i in range(len(seq_indices))]
    starts = [sum(lens[:i]) for i in range(len(lens))]
    tokens = [i for i, n in zip(seq_indices, lens, strict=True) for _ in range(n)]
    meta = (torch.tensor(starts), torch.tensor(lens), torch.tensor(seq_indices), len(lens), max(lens), sum(lens))
    return tokens, meta


@pytest.fixture(params=list(INDEX_CASES), ids=list(INDEX_CASES))
def indices(request: pytest.FixtureRequest) -> list[int]:
    return INDEX_CASES[request.param]


# --- the corrected ops against the per-row reference -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_shrink(indices: list[int], kind: str) -> None:
    tokens, meta = (indices, None) if kind == "bgmv" else _segments(indices)
    x, a = _randn(len(tokens), HIDDEN, seed=1), _weights(RANK, HIDDEN, seed=2)
    y = torch.full((len(tokens), RANK), 7.0)  # shrink overwrites its buffer
    if kind == "bgmv":
        lora_fix.bgmv_shrink(x, a, y, torch.tensor(tokens), 0.5)
    else:
        lora_fix.sgmv_shrink(x, a, y, *meta, 0.5)
    torch.testing.assert_close(y, 0.5 * reference(x, a, tokens))


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_expand(indices: list[int], kind: str, add_inputs: bool) -> None:
    tokens, meta = (indices, None) if kind == "bgmv" else _segments(indices)
    x, b = _randn(len(tokens), RANK, seed=3), _weights(OUT, RANK, seed=4)
    y0 = _randn(len(tokens), OUT, seed=5)
    y = y0.clone()
    if kind == "bgmv":
        lora_fix.bgmv_expand(x, b, y, torch.tensor(tokens), add_inputs)
    else:
        lora_fix.sgmv_expand(x, b, y, *meta, add_inputs)
    torch.testing.assert_close(y, (y0 if add_inputs else 0) + reference(x, b, tokens))


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_expand_slice(indices: list[int], kind: str, add_inputs: bool) -> None:
    tokens, meta = (indices, None) if kind == "bgmv" else _segments(indices)
    offset, size = 8, 10
    x, b = _randn(len(tokens), RANK, seed=6), _weights(size, RANK, seed=7)
    y0 = _randn(len(tokens), OUT, seed=8)
    y = y0.clone()
    if kind == "bgmv":
        lora_fix.bgmv_expand_slice(x, b, y, torch.tensor(tokens), offset, size, add_inputs)
    else:
        lora_fix.sgmv_expand_slice(x, b, y, *meta, offset, size, add_inputs)
    expected = y0.clone()
    window = expected[:, offset : offset + size]
    expected[:, offset : offset + size] = (window if add_inputs else 0) + reference(x, b, tokens)
    torch.testing.assert_close(y, expected)


def test_expand_into_wider_output() -> None:
    # The logits layer pads its output past the adapter's width; only the common columns change.
    x, b = _randn(3, RANK, seed=9), _weights(OUT - 5, RANK, seed=10)
    y0 = _randn(3, OUT, seed=11)
    y = y0.clone()
    lora_fix.bgmv_expand(x, b, y, torch.tensor([1, -1, 2]), True)
    torch.testing.assert_close(y[:, : OUT - 5], y0[:, : OUT - 5] + reference(x, b, [1, -1, 2]))
    torch.testing.assert_close(y[:, OUT - 5 :], y0[:, OUT - 5 :])


def test_shrink_ignores_non_finite_values_in_other_slots() -> None:
    # A no-adapter row must be exactly 0 even if the slot gathered for it holds inf/nan.
    x, a = _randn(2, HIDDEN, seed=12), _weights(RANK, HIDDEN, seed=13)
    a[0] = float("inf")
    y = torch.zeros(2, RANK)
    lora_fix.bgmv_shrink(x, a, y, torch.tensor([-1, 1]), 1.0)
    assert torch.equal(y[0], torch.zeros(RANK))
    torch.testing.assert_close(y[1], a[1, 0] @ x[1])


# --- the fast paths (one product per run, one over all slots), random shapes, both dtypes --------------------------

# Token patterns that reach each path: a single slot (one product), few long runs (a product per run), many short
# runs (one product over every slot, then each row takes its own slot's columns).
PATTERNS: dict[str, list[int]] = {
    "one-slot": [2] * 7,  # the last slot, where a wrapped -1 would also land
    "one-token": [1],
    "all-base": [-1] * 6,
    "two-runs": [1] * 3 + [-1] * 4,
    "long-runs": [0] * 80 + [-1] * 60 + [2] * 60,
    "short-runs": [-1, 0, 0, 2, -1, 1, 1, 1, 0, -1, 2],
    "short-runs-no-base": [2, 0, 1, 1, 0, 2, 2, 1],
    "random": torch.randint(-1, SLOTS, (41,), generator=torch.Generator().manual_seed(40)).tolist(),
}
# bf16 results are rounded to 8 bits of mantissa (and an added product is rounded twice).
TOLERANCE = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2e-2, "atol": 5e-2}}


def _case(pattern: str, dtype: torch.dtype, seed: int) -> tuple[list[int], int, int, torch.Generator]:
    gen = torch.Generator().manual_seed(seed + len(pattern))
    hidden, rank = (int(n) for n in torch.randint(3, 40, (2,), generator=gen))
    return PATTERNS[pattern], hidden, rank, gen


def _slot_weights(out: int, inp: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Distinct slots (a per-slot offset), values small enough for bf16 to keep the comparison meaningful.
    w = torch.randn(SLOTS, 1, out, inp, generator=gen) * 0.5 + 0.2 * torch.arange(1, SLOTS + 1).view(SLOTS, 1, 1, 1)
    return w.to(dtype)


def _exact_reference(x: torch.Tensor, weights: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Per row in float64: zero for -1, else the row times its slot's matrix."""
    rows = [
        torch.zeros(weights.shape[2], dtype=torch.float64) if i < 0 else weights[i, 0].double() @ x[row].double()
        for row, i in enumerate(tokens)
    ]
    return torch.stack(rows)


def _sequences(tokens: list[int], gen: torch.Generator) -> tuple[Any, ...]:
    """sgmv metadata for ``tokens`` cut into sequences of 1-5 tokens, one index each (not merged, unlike vLLM)."""
    lens: list[int] = []
    seq_indices: list[int] = []
    row = 0
    while row < len(tokens):
        n = int(torch.randint(1, 6, (1,), generator=gen))
        while row + n > len(tokens) or len(set(tokens[row : row + n])) != 1:
            n -= 1
        lens.append(n)
        seq_indices.append(tokens[row])
        row += n
    starts = [sum(lens[:i]) for i in range(len(lens))]
    return torch.tensor(starts), torch.tensor(lens), torch.tensor(seq_indices), len(lens), max(lens), len(tokens)


def _call(name: str, args: tuple[Any, ...], tokens: list[int], gen: torch.Generator, tail: tuple[Any, ...]) -> None:
    x, w, y = args
    meta = _sequences(tokens, gen) if name.startswith("sgmv") else (torch.tensor(tokens),)
    lora_fix.CORRECTED[name](x, w, y, *meta, *tail)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("kind", ["bgmv", "sgmv"])
def test_fast_shrink_equals_the_per_row_reference(kind: str, pattern: str, dtype: torch.dtype) -> None:
    tokens, hidden, rank, gen = _case(pattern, dtype, seed=50)
    x = torch.randn(len(tokens), hidden, generator=gen).to(dtype)
    a = _slot_weights(rank, hidden, dtype, gen)
    y = torch.full((len(tokens), rank + 2), 7.0)  # float32 like vLLM's buffer; only the first `rank` columns written
    _call(f"{kind}_shrink", (x, a, y), tokens, gen, (0.5,))
    expected = (0.5 * _exact_reference(x, a, tokens)).float()
    torch.testing.assert_close(y[:, :rank], expected, rtol=1e-5, atol=1e-5)  # computed in float32 either way
    assert torch.equal(y[:, rank:], torch.full((len(tokens), 2), 7.0))
    base = [row for row, i in enumerate(tokens) if i < 0]
    assert torch.equal(y[base, :rank], torch.zeros(len(base), rank))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("add_inputs", [True, False], ids=["add", "write"])
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("name", ["bgmv_expand", "bgmv_expand_slice", "sgmv_expand", "sgmv_expand_slice"])
def test_fast_expand_equals_the_per_row_reference(
    name: str, pattern: str, add_inputs: bool, dtype: torch.dtype
) -> None:
    tokens, width, rank, gen = _case(pattern, dtype, seed=60)
    sliced = name.endswith("slice")
    offset, size = (int(torch.randint(0, 6, (1,), generator=gen)), width) if sliced else (0, width)
    total = offset + size + (3 if sliced else 0)
    x = torch.randn(len(tokens), rank, generator=gen)  # float32, as vLLM's shrink buffer
    b = _slot_weights(size, rank, dtype, gen)
    y0 = torch.randn(len(tokens), total, generator=gen).to(dtype)
    y = y0.clone()
    _call(name, (x, b, y), tokens, gen, (offset, size, add_inputs) if sliced else (add_inputs,))
    product = _exact_reference(x.to(dtype), b, tokens)
    window = y0[:, offset : offset + size].double()
    expected = y0.clone()
    expected[:, offset : offset + size] = ((window if add_inputs else 0) + product).to(dtype)
    torch.testing.assert_close(y, expected, **TOLERANCE[dtype])
    assert torch.equal(y[:, :offset], y0[:, :offset]) and torch.equal(y[:, offset + size :], y0[:, offset + size :])
    base = [row for row, i in enumerate(tokens) if i < 0]
    base_rows = y0[base] if add_inputs else expected[base]  # untouched, or exactly zero in the window
    assert torch.equal(y[base], base_rows)


@pytest.mark.parametrize("pattern", ["one-slot", "short-runs"])
def test_expand_keeps_each_row_to_its_own_slot(pattern: str) -> None:
    # One product over every slot must not let a slot's values reach rows of other slots or base rows.
    tokens = PATTERNS[pattern]
    x = _randn(len(tokens), RANK, seed=70)
    b = torch.cat([_weights(OUT, RANK, seed=71), torch.full((1, 1, OUT, RANK), float("nan"))])  # a slot no row uses
    y0 = _randn(len(tokens), OUT, seed=72)
    y = y0.clone()
    lora_fix.bgmv_expand(x, b, y, torch.tensor(tokens), True)
    torch.testing.assert_close(y, y0 + reference(x, b, tokens))


@pytest.mark.parametrize("add_inputs", [True, False])
@pytest.mark.parametrize("index", [2, -1])
def test_bgmv_expand_broadcasts_one_row_over_the_output(index: int, add_inputs: bool) -> None:
    # As vLLM: one input row (one index) and several output rows add (or write) the same product to every row.
    x, b = _randn(1, RANK, seed=73), _weights(OUT, RANK, seed=74)
    y0 = _randn(3, OUT, seed=75)
    y = y0.clone()
    lora_fix.bgmv_expand(x, b, y, torch.tensor([index]), add_inputs)
    product = reference(x, b, [index]).expand(3, OUT)
    torch.testing.assert_close(y, (y0 if add_inputs else 0) + product)


@pytest.mark.parametrize("tokens", [[1, 1, 1], [1, -1, 2]], ids=["one-slot", "short-runs"])
def test_expand_into_narrower_output(tokens: list[int]) -> None:
    # An adapter padded wider than the output: only the output's columns, on both paths.
    x, b = _randn(3, RANK, seed=76), _weights(OUT + 5, RANK, seed=77)
    y0 = _randn(3, OUT, seed=78)
    y = y0.clone()
    lora_fix.bgmv_expand(x, b, y, torch.tensor(tokens), True)
    torch.testing.assert_close(y, y0 + reference(x, b, tokens)[:, :OUT])


@pytest.mark.parametrize("tokens", [[1, 1, 1, 1], [1, -1, 0, 2, 1, 0, -1, 1]], ids=["one-slot", "short-runs"])
def test_a_zero_slot_is_skipped_until_it_is_written(tokens: list[int]) -> None:
    # vLLM zeroes a slot for modules its adapter leaves alone; skipping it must not outlive the next write to it.
    x, a = _randn(len(tokens), HIDDEN, seed=80), _weights(RANK, HIDDEN, seed=81)
    a[1] = 0  # as reset_lora
    if 0 in tokens or 2 in tokens:
        a[0] = a[2] = 0
    y = torch.full((len(tokens), RANK), 7.0)
    lora_fix.bgmv_shrink(x, a, y, torch.tensor(tokens), 1.0)
    assert torch.equal(y, torch.zeros(len(tokens), RANK))
    b = _weights(OUT, RANK, seed=82)
    b[1] = 0
    y0 = _randn(len(tokens), OUT, seed=83)
    y = y0.clone()
    lora_fix.bgmv_expand(x[:, :RANK], b, y, torch.tensor(tokens), True)
    torch.testing.assert_close(y, y0 + reference(x[:, :RANK], b, tokens))
    # vLLM loads an adapter into the slot in place (set_lora's copy_): the next call must use it.
    a[1, 0].copy_(_randn(RANK, HIDDEN, seed=84))
    b[1, 0, :5].copy_(_randn(5, RANK, seed=85))
    y = torch.full((len(tokens), RANK), 7.0)
    lora_fix.bgmv_shrink(x, a, y, torch.tensor(tokens), 1.0)
    torch.testing.assert_close(y, reference(x, a, tokens))
    y = y0.clone()
    lora_fix.bgmv_expand(x[:, :RANK], b, y, torch.tensor(tokens), True)
    torch.testing.assert_close(y, y0 + reference(x[:, :RANK], b, tokens))


@pytest.mark.parametrize("tokens", [[1, 1], [1, 1] * 40 + [-1] * 60], ids=["one-slot", "long-runs"])
def test_a_bf16_slot_cast_for_the_float32_buffer_follows_writes(tokens: list[int]) -> None:
    # bf16 weights into vLLM's float32 shrink buffer: the float32 copy of a slot must be redone after a write.
    x = _randn(len(tokens), HIDDEN, seed=87).bfloat16()
    a = _weights(RANK, HIDDEN, seed=88).bfloat16()
    for seed in (89, 90):
        y = torch.zeros(len(tokens), RANK)
        lora_fix.bgmv_shrink(x, a, y, torch.tensor(tokens), 1.0)
        torch.testing.assert_close(y, reference(x.float(), a.float(), tokens))
        a[1, 0] = _randn(RANK, HIDDEN, seed=seed).bfloat16()


def test_weights_made_in_inference_mode_are_never_skipped() -> None:
    # Inference tensors keep no version counter, so nothing is remembered about them.
    x = _randn(2, HIDDEN, seed=86)
    with torch.inference_mode():
        a = torch.zeros(SLOTS, 1, RANK, HIDDEN)
        y = torch.full((2, RANK), 7.0)
        lora_fix.bgmv_shrink(x, a, y, torch.tensor([1, 1]), 1.0)
        assert torch.equal(y, torch.zeros(2, RANK))
        a[1, 0] = 1.0
        lora_fix.bgmv_shrink(x, a, y, torch.tensor([1, 1]), 1.0)
    torch.testing.assert_close(y, reference(x, torch.ones(SLOTS, 1, RANK, HIDDEN), [1, 1]))


# --- detection -----------------------------------------------------------------------------------------------------


def _wrapping_bgmv_shrink(
    inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, indices: torch.Tensor, scaling: float = 1.0
) -> None:
    # vLLM 0.32.0's bgmv_shrink: weights[indices] with -1 wrapping to the last slot.
    selected = weights[indices].to(dtype=out.dtype).squeeze(dim=1)
    out[:, : selected.shape[1]] = scaling * torch.einsum("bi, boi -> bo", inputs.to(dtype=out.dtype), selected)


def _wrapping_bgmv_expand(
    inputs: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, indices: torch.Tensor, add_inputs: bool = True
) -> None:
    selected = weights[indices].to(dtype=out.dtype).squeeze(dim=1)
    outputs = torch.einsum("bi, boi -> bo", inputs.to(dtype=out.dtype), selected)
    if add_inputs:
        out[:, : outputs.shape[1]] += outputs
    else:
        out[:, : outputs.shape[1]] = outputs


def _installed_ops() -> ModuleType:
    """A private copy of the installed vLLM's torch LoRA ops, untouched by apply() in this process."""
    pytest.importorskip("vllm")
    spec = importlib.util.find_spec(lora_fix.OPS_MODULE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_probe_flags_an_op_that_wraps_minus_one() -> None:
    assert lora_fix.probe("bgmv_shrink", _wrapping_bgmv_shrink) == "defective"
    assert lora_fix.probe("bgmv_expand", _wrapping_bgmv_expand) == "defective"


@pytest.mark.parametrize("name", list(lora_fix.CORRECTED))
def test_probe_passes_the_corrected_ops(name: str) -> None:
    assert lora_fix.probe(name, lora_fix.CORRECTED[name]) == "fine"


def test_probe_does_not_claim_an_op_it_cannot_run() -> None:
    def other_signature(inputs: torch.Tensor) -> None:
        raise TypeError("not the op")

    def wrong_everywhere(*args: Any) -> None:
        args[2].fill_(123.0)

    assert lora_fix.probe("bgmv_shrink", other_signature) == "unknown"
    assert lora_fix.probe("sgmv_expand", wrong_everywhere) == "unknown"


@pytest.mark.parametrize("name", list(lora_fix.CORRECTED))
def test_corrected_ops_equal_vllms_when_every_row_has_an_adapter(name: str) -> None:
    # Off the -1 rows the correction computes what vLLM does, up to float rounding: one matrix product per run of
    # rows sums in another order than vLLM's product per row.
    tokens, meta = _segments(INDEX_CASES["no-base"])
    seq_or_tokens = meta if name.startswith("sgmv") else (torch.tensor(tokens),)
    if name.endswith("shrink"):
        x, w, y0, tail = (
            _randn(len(tokens), HIDDEN, seed=30),
            _weights(RANK, HIDDEN, seed=31),
            torch.zeros(9, RANK),
            (0.5,),
        )
    else:
        size = OUT if name.endswith("expand") else 10
        x, w, y0 = _randn(len(tokens), RANK, seed=32), _weights(size, RANK, seed=33), _randn(len(tokens), OUT, seed=34)
        tail = (True,) if name.endswith("expand") else (8, size, True)
    y0 = y0[: len(tokens)]
    ours, theirs = y0.clone(), y0.clone()
    lora_fix.CORRECTED[name](x, w, ours, *seq_or_tokens, *tail)
    getattr(_installed_ops(), name)(x, w, theirs, *seq_or_tokens, *tail)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(lora_fix.CORRECTED))
def test_probe_on_the_installed_vllm(name: str) -> None:
    verdict = lora_fix.probe(name, getattr(_installed_ops(), name))
    # "unknown" would mean the ops changed shape: the correction could no longer be applied.
    assert verdict != "unknown"
    if verdict == "fine":
        pytest.skip(f"the installed vLLM's {name} already handles -1; apply() leaves it alone")
    assert verdict == "defective"


@pytest.fixture(autouse=True)
def _restore_vllm_classes(monkeypatch: pytest.MonkeyPatch) -> None:
    """apply() may patch vLLM's CPU LoRA wrapper and model manager: every test here leaves them as it found them."""
    if importlib.util.find_spec("vllm") is None:
        return
    wrapper = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu").PunicaWrapperCPU
    manager = importlib.import_module(lora_fix.MODEL_MANAGER).LoRAModelManager
    for cls, method in ((wrapper, "update_metadata"), (wrapper, "add_lora_linear"), (manager, "activate_adapter")):
        monkeypatch.setattr(cls, method, getattr(cls, method))


# --- apply() in this process ---------------------------------------------------------------------------------------


def test_apply_corrects_the_ops_vllm_calls(punica_cpu: ModuleType) -> None:
    torch_ops = sys.modules["vllm.lora.ops.torch_ops"]
    ops = sys.modules[lora_fix.OPS_MODULE]
    for name in lora_fix.CORRECTED:
        for module in (punica_cpu, torch_ops, ops):
            assert lora_fix.probe(name, getattr(module, name)) == "fine", f"{module.__name__}.{name}"


def test_apply_is_idempotent_and_logs_once(punica_cpu: ModuleType, caplog: pytest.LogCaptureFixture) -> None:
    before = {name: getattr(punica_cpu, name) for name in lora_fix.CORRECTED}
    with caplog.at_level(logging.DEBUG, logger="loraserve.lora_fix"):
        assert lora_fix.apply() == []
        lora_fix._applied = False  # even a second full run finds nothing left to correct
        assert lora_fix.apply() == []
    assert {name: getattr(punica_cpu, name) for name in lora_fix.CORRECTED} == before
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_apply_leaves_other_platforms_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lora_fix, "_applied", False)
    monkeypatch.setattr(lora_fix, "_uses_torch_ops", lambda: False)
    assert lora_fix.apply() == []


def test_apply_never_stops_vllm_from_starting(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def moved() -> ModuleType:
        raise ModuleNotFoundError(lora_fix.OPS_MODULE)

    monkeypatch.setattr(lora_fix, "_applied", False)
    monkeypatch.setattr(lora_fix, "_uses_torch_ops", lambda: True)
    monkeypatch.setattr(lora_fix, "_ops_module", moved)
    with caplog.at_level(logging.WARNING, logger="loraserve.lora_fix"):
        assert lora_fix.apply() == []
    assert "Could not check" in caplog.text


def test_apply_warns_about_ops_it_cannot_check(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    changed = ModuleType("vllm_changed_ops")
    for name in lora_fix.CORRECTED:
        setattr(changed, name, lambda *args: None)  # a different contract: writes nothing
    monkeypatch.setattr(lora_fix, "_applied", False)
    monkeypatch.setattr(lora_fix, "_uses_torch_ops", lambda: True)
    monkeypatch.setattr(lora_fix, "_ops_module", lambda: changed)
    with caplog.at_level(logging.WARNING, logger="loraserve.lora_fix"):
        assert lora_fix.apply() == []
    assert "could not check bgmv_shrink" in caplog.text


def test_apply_can_be_switched_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ops = _installed_ops()  # the defective originals, so the check runs whatever this process patched already
    fake_vllm = ModuleType("vllm_fake_ops")
    for name in lora_fix.CORRECTED:
        setattr(fake_vllm, name, getattr(ops, name))
    monkeypatch.setattr(lora_fix, "_ops_module", lambda: fake_vllm)
    monkeypatch.setattr(lora_fix, "_applied", False)
    monkeypatch.setattr(lora_fix, "_uses_torch_ops", lambda: True)
    monkeypatch.setenv(lora_fix.DISABLE_ENV, "1")
    with caplog.at_level(logging.WARNING, logger="loraserve.lora_fix"):
        assert lora_fix.apply() == []
    assert fake_vllm.bgmv_shrink is ops.bgmv_shrink
    assert lora_fix.DISABLE_ENV in caplog.text


# --- through PunicaWrapperCPU, as the model's LoRA layers call it ---------------------------------------------------

# Slot i holds adapter id 11 + i; id 0 is the base model.
SLOT_IDS = [11, 12, 13]


def _wrapper(punica_cpu: ModuleType, token_ids: list[int], request_ids: list[int], prefill: bool) -> Any:
    wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=64, max_batches=16, device="cpu")
    mapping = SimpleNamespace(index_mapping=tuple(token_ids), prompt_mapping=tuple(request_ids), is_prefill=prefill)
    wrapper.update_metadata(mapping, SLOT_IDS, len(SLOT_IDS) + 1, 32)
    return wrapper


def _slots(ids: list[int]) -> list[int]:
    return [SLOT_IDS.index(i) if i else -1 for i in ids]


@pytest.mark.parametrize("prefill", [True, False], ids=["prefill-sgmv", "decode-bgmv"])
def test_wrapper_linear_lora_per_row(punica_cpu: ModuleType, prefill: bool) -> None:
    # Three requests (base, adapter 13 = the last slot, base) of 2 + 3 + 1 tokens, then adapter 11.
    token_ids = [0, 0, 13, 13, 13, 0, 11]
    wrapper = _wrapper(punica_cpu, token_ids, [0, 13, 0, 11], prefill)
    x = _randn(len(token_ids), HIDDEN, seed=20)
    a, b = _weights(RANK, HIDDEN, seed=21), _weights(OUT, RANK, seed=22)
    y0 = _randn(len(token_ids), OUT, seed=23)
    slots = _slots(token_ids)
    expected = y0 + 0.5 * reference(reference(x, a, slots), b, slots)
    # What the engine runs (loraserve's planned layer, unless switched off) and vLLM's own wrapper over the ops.
    vllms = getattr(type(wrapper).add_lora_linear, "__wrapped__", None)
    for add_lora_linear in (wrapper.add_lora_linear, *([partial(vllms, wrapper)] if vllms else [])):
        y = y0.clone()
        add_lora_linear(y, x, (a,), (b,), 0.5, (OUT,))
        torch.testing.assert_close(y, expected)
        assert torch.equal(y[[0, 1, 5]], y0[[0, 1, 5]])  # base rows: exactly the base layer's output


@pytest.mark.parametrize(
    ("token_ids", "request_ids"), [([13, 0, 0, 12, 0], [13, 0, 12, 0]), ([0, 0, 0], [0, 0])], ids=["mixed", "all-base"]
)
def test_wrapper_logits_lora_per_request(punica_cpu: ModuleType, token_ids: list[int], request_ids: list[int]) -> None:
    # The logits layer always takes the bgmv path: unlike prefill there is no "no LoRA in this batch" shortcut,
    # so even a batch of base requests alone would read the last slot's lm_head LoRA.
    vocab = 40
    wrapper = _wrapper(punica_cpu, token_ids, request_ids, True)
    x = _randn(len(request_ids), HIDDEN, seed=24)
    a, b = _weights(RANK, HIDDEN, seed=25), _weights(vocab, RANK, seed=26)
    y0 = _randn(len(request_ids), vocab, seed=27)
    y = y0.clone()
    wrapper.add_lora_logits(y, x, a, b, 1.0)
    slots = _slots(request_ids)
    torch.testing.assert_close(y, y0 + reference(reference(x, a, slots), b, slots))
