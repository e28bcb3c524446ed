"""Time the CPU LoRA ops one by one: vLLM's own, loraserve's at a git revision (``--baseline``), and the working tree's.

The shapes are those vLLM uses for the embedded SmolLM2-135M (read from its config.json) with loraserve's engine
defaults (4 LoRA slots, max LoRA rank 16): per decoder layer, the q/k/v projection is one shrink per slice into a
float32 buffer and one expand_slice per slice into the (tokens, q+k+v) output; o_proj is one shrink and one
expand_slice. vLLM 0.32.0 always takes the sgmv path for linear layers (its v1 runner marks every batch as prefill;
``PunicaWrapperCPU`` skips the op when no row has an adapter); the logits layer uses bgmv. Rows are decode tokens.

Besides each op alone, "layer" times one decoder layer's LoRA work through vLLM's real ``PunicaWrapperCPU``, as the
model calls it, with each implementation bound in turn: vLLM gives every module it can adapt a LoRA layer, so a
layer runs ``add_lora_linear`` for qkv and o (the adapter's weights) and for gate_up and down (zeroed slots, as
vLLM's ``reset_lora`` leaves them for a q/k/v/o adapter).

Index patterns: ``base`` every row -1, ``1`` one slot for every row, ``2``/``4`` slots drawn at random per row,
``4+base`` four slots and -1 at random. The ``no-op`` column runs ops that do nothing, so its "layer" figure is
the cost of vLLM's wrapper alone; ``planned`` runs loraserve's planned ``add_lora_linear``
(``engine/lora_linear.py``, what the engine runs on CPU) in place of the wrapper's, so it has a "layer" figure
only. Prints a table (microseconds per call, median of ``--repeats``) and saves JSON under benchmarks/results/.
Run on a quiet machine if you can; say so when you cannot.

    .venv/bin/python benchmarks/lora_ops.py [--batches 1 8 32] [--dtypes float32 bfloat16] [--threads 1]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loraserve.engine import lora_fix, lora_linear  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SLOTS, RANK = 4, 16
PATTERNS = ["base", "1", "2", "4", "4+base"]
OPS = ["sgmv_shrink", "sgmv_expand_slice", "bgmv_shrink", "bgmv_expand_slice", "bgmv_expand", "layer"]


def _model_shapes() -> dict[str, int]:
    from loraserve.demo import embedded_model_dir

    config = json.loads((embedded_model_dir(Path.home() / ".cache" / "loraserve") / "config.json").read_text())
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return {
        "hidden": config["hidden_size"],
        "q": config["num_attention_heads"] * head_dim,
        "kv": config["num_key_value_heads"] * head_dim,
        "vocab": config["vocab_size"],
        "intermediate": config["intermediate_size"],
        "layers": config["num_hidden_layers"],
    }


def _load(name: str, source: str) -> ModuleType:
    module = ModuleType(name)
    exec(compile(source, name, "exec"), module.__dict__)
    return module


def _implementations(baseline: str) -> dict[str, ModuleType]:
    spec = importlib.util.find_spec(lora_fix.OPS_MODULE)
    assert spec is not None and spec.loader is not None
    vllm_ops = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vllm_ops)
    old = subprocess.run(
        ["git", "show", f"{baseline}:src/loraserve/engine/lora_fix.py"], cwd=ROOT, capture_output=True, text=True
    )
    impls = {"vllm": vllm_ops}
    if old.returncode == 0:
        impls[f"loraserve@{baseline}"] = _load("lora_fix_baseline", old.stdout)
    else:
        print(f"(no loraserve at {baseline}: {old.stderr.strip()})", file=sys.stderr)
    impls["loraserve"] = lora_fix
    # loraserve's planned add_lora_linear (engine/lora_linear.py), its ops bound underneath for what it leaves.
    impls["planned"] = ModuleType("planned")
    vars(impls["planned"]).update({name: getattr(lora_fix, name) for name in lora_fix.CORRECTED}, planned=True)
    # Ops that do nothing: what is left of "layer" is vLLM's PunicaWrapperCPU around the ops (buffers, metadata).
    impls["no-op"] = ModuleType("no_op_ops")
    for name in lora_fix.CORRECTED:
        setattr(impls["no-op"], name, lambda *args: None)
    return impls


def _indices(pattern: str, tokens: int, gen: torch.Generator) -> torch.Tensor:
    if pattern == "base":
        return torch.full((tokens,), -1)
    if pattern == "1":
        return torch.zeros(tokens, dtype=torch.long)
    low = -1 if pattern.endswith("+base") else 0
    return torch.randint(low, int(pattern.split("+")[0]), (tokens,), generator=gen)


def _sgmv_meta(indices: torch.Tensor) -> tuple[Any, ...]:
    # As vLLM's compute_meta: consecutive tokens with one index form one segment.
    seg_idx, lens = torch.unique_consecutive(indices, return_counts=True)
    starts = torch.zeros_like(lens)
    starts[1:] = torch.cumsum(lens, 0)[:-1]
    return starts, lens, seg_idx, seg_idx.numel(), int(lens.max()), int(lens.sum())


def _time(fn: Callable[[], object], repeats: int, budget_s: float) -> tuple[float, float, float]:
    """Median, min and max microseconds per call over ``repeats`` rounds of calls sized to ``budget_s``."""
    fn()
    start = time.perf_counter()
    calls = 0
    while time.perf_counter() - start < budget_s / 10 or calls < 3:
        fn()
        calls += 1
    per_round = max(3, int(calls * 10 / repeats / 2))
    rounds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(per_round):
            fn()
        rounds.append((time.perf_counter() - t0) / per_round * 1e6)
    return statistics.median(rounds), min(rounds), max(rounds)


def _cases(
    op: str, impl: ModuleType, shapes: dict[str, int], tokens: int, indices: torch.Tensor, dtype: torch.dtype
) -> Callable[[], object]:
    gen = torch.Generator().manual_seed(1)
    hidden, q, kv = shapes["hidden"], shapes["q"], shapes["kv"]
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    a = (torch.randn(SLOTS, 1, RANK, hidden, generator=gen) / 10).to(dtype)
    b = (torch.randn(SLOTS, 1, kv, RANK, generator=gen) / 10).to(dtype)
    buffer = torch.randn(tokens, RANK, generator=gen)  # float32, as PunicaWrapperCPU allocates it
    y = torch.randn(tokens, q + 2 * kv, generator=gen).to(dtype)
    meta = _sgmv_meta(indices)
    f = getattr(impl, op, None)
    if op == "sgmv_shrink":
        return lambda: f(x, a, buffer, *meta, 1.0)
    if op == "sgmv_expand_slice":
        return lambda: f(buffer, b, y, *meta, q, kv, True)
    if op == "bgmv_shrink":
        return lambda: f(x, a, buffer, indices, 1.0)
    if op == "bgmv_expand_slice":
        return lambda: f(buffer, b, y, indices, q, kv, True)
    if op == "bgmv_expand":
        return lambda: f(buffer, b, y[:, :kv].contiguous(), indices, True)
    raise ValueError(op)


def _layer(impl: ModuleType, shapes: dict[str, int], tokens: int, indices: torch.Tensor, dtype: torch.dtype) -> Any:
    """One decoder layer's LoRA through PunicaWrapperCPU (qkv then o), ``impl``'s ops bound into punica_cpu."""
    punica_cpu = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    gen = torch.Generator().manual_seed(2)
    hidden, q, kv = shapes["hidden"], shapes["q"], shapes["kv"]
    wrapper = punica_cpu.PunicaWrapperCPU(max_num_batched_tokens=256, max_batches=256, device="cpu")
    ids = [0 if i < 0 else 11 + i for i in indices.tolist()]
    mapping = SimpleNamespace(index_mapping=tuple(ids), prompt_mapping=tuple(ids), is_prefill=True)
    wrapper.update_metadata(mapping, [11 + i for i in range(SLOTS)], SLOTS + 1, shapes["vocab"])
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    qkv_a = tuple((torch.randn(SLOTS, 1, RANK, hidden, generator=gen) / 10).to(dtype) for _ in range(3))
    qkv_b = tuple((torch.randn(SLOTS, 1, n, RANK, generator=gen) / 10).to(dtype) for n in (q, kv, kv))
    o_a = ((torch.randn(SLOTS, 1, RANK, hidden, generator=gen) / 10).to(dtype),)
    o_b = ((torch.randn(SLOTS, 1, hidden, RANK, generator=gen) / 10).to(dtype),)
    inter = shapes["intermediate"]
    mlp_a = tuple(torch.zeros(SLOTS, 1, RANK, hidden, dtype=dtype) for _ in range(2))
    mlp_b = tuple(torch.zeros(SLOTS, 1, inter, RANK, dtype=dtype) for _ in range(2))
    down_a = (torch.zeros(SLOTS, 1, RANK, inter, dtype=dtype),)
    down_b = (torch.zeros(SLOTS, 1, hidden, RANK, dtype=dtype),)
    y_qkv = torch.randn(tokens, q + 2 * kv, generator=gen).to(dtype)
    y_o = torch.randn(tokens, hidden, generator=gen).to(dtype)
    y_mlp = torch.randn(tokens, 2 * inter, generator=gen).to(dtype)
    x_down = torch.randn(tokens, inter, generator=gen).to(dtype)
    bound = {name: getattr(impl, name) for name in lora_fix.CORRECTED}
    if getattr(impl, "planned", False):
        lora_linear.plan_step(wrapper)
        plan = wrapper.__dict__[lora_linear._PLAN]

        def add_lora_linear(*args: Any) -> None:
            assert lora_linear.add_lora_linear(plan, *args)

    else:

        def add_lora_linear(*args: Any) -> None:
            wrapper.add_lora_linear(*args)

    def run() -> None:
        saved = {name: vars(punica_cpu)[name] for name in bound}
        vars(punica_cpu).update(bound)
        try:
            add_lora_linear(y_qkv, x, qkv_a, qkv_b, 1.0, (q, kv, kv))
            add_lora_linear(y_o, x, o_a, o_b, 1.0, (hidden,))
            add_lora_linear(y_mlp, x, mlp_a, mlp_b, 1.0, (inter, inter))
            add_lora_linear(y_o, x_down, down_a, down_b, 1.0, (hidden,))
        finally:
            vars(punica_cpu).update(saved)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--patterns", nargs="+", default=PATTERNS)
    parser.add_argument("--ops", nargs="+", default=OPS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (vLLM on CPU computes on one core)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per measurement")
    parser.add_argument("--baseline", default="2ff0668", help="git revision of loraserve's ops to compare")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shapes = _model_shapes()
    impls = _implementations(args.baseline)
    gen = torch.Generator().manual_seed(0)
    rows = []
    names = list(impls)
    print(f"SmolLM2 shapes {shapes}, {SLOTS} slots, rank {RANK}, {args.threads} thread(s); us per call, median")
    print(f"{'op':<18} {'dtype':<9} {'T':>3} {'slots':<7} " + " ".join(f"{n:>22}" for n in names))
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for tokens in args.batches:
            for pattern in args.patterns:
                if tokens == 1 and pattern not in ("base", "1"):
                    continue
                indices = _indices(pattern, tokens, gen)
                for op in args.ops:
                    cells = []
                    for name, impl in impls.items():
                        if name in ("no-op", "planned") and op != "layer":
                            cells.append(f"{'':>22}")
                            continue
                        if op == "layer":
                            fn = _layer(impl, shapes, tokens, indices, dtype)
                        else:
                            fn = _cases(op, impl, shapes, tokens, indices, dtype)
                        median, low, high = _time(fn, args.repeats, args.budget)
                        rows.append(
                            {
                                "op": op,
                                "dtype": dtype_name,
                                "tokens": tokens,
                                "pattern": pattern,
                                "impl": name,
                                "us_median": median,
                                "us_min": low,
                                "us_max": high,
                            }
                        )
                        cells.append(f"{median:9.1f} [{low:5.0f}-{high:5.0f}]")
                    print(f"{op:<18} {dtype_name:<9} {tokens:>3} {pattern:<7} " + " ".join(f"{c:>22}" for c in cells))
    result = {
        "benchmark": "lora_ops",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg": os.getloadavg(),
            "torch": torch.__version__,
        },
        "threads": args.threads,
        "shapes": shapes | {"slots": SLOTS, "rank": RANK},
        "baseline": args.baseline,
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"lora_ops-{int(time.time())}.json"
    path.write_text(json.dumps(result, indent=2))
    print(f"saved {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
