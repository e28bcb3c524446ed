"""The offline engine (``vllm.LLM``) on the scenario-1 requests: the physical limit the servers are held to.

Run in a process of its own, as the servers are: ``python -m benchmarks.compare.offline SPEC.json OUT.json``.
The chat prompts are rendered with the model's chat template, each with its adapter's LoRARequest, and all
are handed to one ``generate`` call: no HTTP, no streaming, the scheduler batching as it likes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# The two core bindings tried; the faster one in each repetition is the limit. vLLM's default on CPU reserves
# a core for an API process that the offline engine does not have; binding all of them was faster once
# (DESIGN.md: 20.3 → 25.5 tok/s), slower once this harness ran (the Python side then shares the cores).
CONFIGS: dict[str, dict[str, str]] = {
    "default_binding": {},
    "all_cores": {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}


def run(spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    # As loraserve does: one second for vLLM's workers to exit at the end, not five before being killed.
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")
    started = time.monotonic()
    llm = LLM(model=spec["model_dir"], **spec["engine"])
    startup_s = time.monotonic() - started
    tokenizer = llm.get_tokenizer()
    loras = {name: LoRARequest(name, i, path) for i, (name, path) in enumerate(spec["adapters"].items(), start=1)}

    def prompt(text: str) -> TokensPrompt:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return TokensPrompt(prompt_token_ids=tokenizer.encode(rendered, add_special_tokens=False))

    def generate(requests: list[dict[str, Any]]) -> tuple[float, int]:
        params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
        prompts = [prompt(r["prompt"]) for r in requests]
        lora = [loras.get(r["model"]) for r in requests]
        sent = time.monotonic()
        outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)  # type: ignore[arg-type]
        return time.monotonic() - sent, sum(len(o.outputs[0].token_ids) for o in outputs)

    # Untimed: every adapter loaded once, as the servers' warm-up does.
    generate([{"model": name, "prompt": "Hello", "max_tokens": 1} for name in ["", *loras]])
    # As the servers do: the batch several times, the median round's figures.
    rounds = [generate(spec["requests"]) for _ in range(spec.get("rounds", 1))]
    wall, tokens = sorted(rounds, key=lambda r: r[1] / r[0])[(len(rounds) - 1) // 2]
    return {
        "startup_s": startup_s,
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tok_s": tokens / wall,
        "requests_s": len(spec["requests"]) / wall,
        "rounds_output_tok_s": [t / w for w, t in rounds],
    }


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
