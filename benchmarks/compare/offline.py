"""The offline engine (``vllm.LLM``) on the scenario-1 requests: the physical limit the servers are held to.

Run in a process of its own, as the servers are: ``python -m benchmarks.compare.offline SPEC.json OUT.json``.
The chat prompts are rendered with the model's chat template, each with its adapter's LoRARequest, and all
are handed to one ``generate`` call: no HTTP, no streaming, the scheduler batching as it likes.

``python -m benchmarks.compare.offline SPEC.json --rounds-on-stdin`` keeps the engine up instead and runs
one batch per line it reads, answering each with a JSON line: ``OfflineRounds`` drives it, so a server's
scenario-1 rounds and the offline engine's alternate and each pair is compared at the same moment
(separate offline processes of one commit differ by ±10 %, as much as the gap measured).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

READY = "ready"
STARTUP_TIMEOUT_S = 600

# The two core bindings tried; the faster one in each repetition is the limit. vLLM's default on CPU reserves
# a core for an API process that the offline engine does not have; binding all of them was faster once
# (DESIGN.md: 20.3 → 25.5 tok/s), slower once this harness ran (the Python side then shares the cores).
CONFIGS: dict[str, dict[str, str]] = {
    "default_binding": {},
    "all_cores": {"VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"},
}
# The binding of the offline engine kept beside a server for paired rounds: the faster of the two in every run
# here, and how loraserve binds vLLM on CPU by default.
PAIRED_BINDING = "all_cores"


Batch = Callable[[list[dict[str, Any]]], tuple[float, int]]


def start(spec: dict[str, Any]) -> tuple[float, Batch]:
    """Start the engine and load every adapter once; return the startup time and a timed batch runner."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.platforms import current_platform

    from loraserve.engine.cpu_priority import set_engine_priority
    from loraserve.gc_heap import freeze_startup_heap

    # As loraserve does: one second for vLLM's workers to exit at the end, not five before being killed; and its
    # processes step aside for this one (which renders, sends and reads), as they do for the server.
    os.environ.setdefault("VLLM_WORKER_SHUTDOWN_TIMEOUT_SECONDS", "1")
    if current_platform.is_cpu():
        set_engine_priority("idle")
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
    # As loraserve's and vLLM's servers do once up: the startup heap out of the collector's way, else a full
    # collection (~0.7 s with vLLM imported) may land in a timed batch.
    freeze_startup_heap()
    return startup_s, generate


def run(spec: dict[str, Any]) -> dict[str, Any]:
    startup_s, generate = start(spec)
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


def serve_rounds(spec: dict[str, Any]) -> None:
    """Answer each line on stdin with one timed batch, as a JSON line on the original stdout."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # vLLM logs to stdout: from here on that is the log, and ``answers`` carries only answers
    startup_s, generate = start(spec)
    answers.write(json.dumps({READY: True, "startup_s": startup_s}) + "\n")
    for _ in sys.stdin:
        wall, tokens = generate(spec["requests"])
        answers.write(json.dumps({"wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall}) + "\n")


class OfflineRounds:
    """The offline engine kept up in its own process group beside a server; ``round()`` runs one batch.

    Only one of the two computes at a time: the caller waits for the server's round to end before asking.
    """

    def __init__(self, spec_file: Path, env: dict[str, str], log: Path, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
        self._log = log.open("wb")
        self._timeout_s = timeout_s
        self.process = subprocess.Popen(
            self.command(spec_file), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, env=env,
            text=True, start_new_session=True,
        )  # fmt: skip
        try:
            self.startup_s = float(self._answer()["startup_s"])
        except BaseException:
            self.close(graceful=False)
            raise

    @staticmethod
    def command(spec_file: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks.compare.offline", str(spec_file), "--rounds-on-stdin"]

    def round(self) -> dict[str, Any]:
        stdin = self._pipe(self.process.stdin)
        stdin.write("round\n")
        stdin.flush()
        return self._answer()

    def _answer(self) -> dict[str, Any]:
        stdout = self._pipe(self.process.stdout)
        ready, _, _ = select.select([stdout], [], [], self._timeout_s)
        line = stdout.readline() if ready else ""
        if not line:
            raise RuntimeError(
                f"the offline engine stopped or did not answer within {self._timeout_s:g} s; see {self._log.name}"
            )
        answer: dict[str, Any] = json.loads(line)
        return answer

    @staticmethod
    def _pipe(stream: IO[str] | None) -> IO[str]:
        if stream is None:
            raise RuntimeError("the offline engine's pipes are not open")
        return stream

    def close(self, graceful: bool = True) -> None:
        """End of input lets the engine shut down on its own; then its whole process group is stopped."""
        from .servers import stop  # the servers' stop: SIGTERM to the group, then wait until it is gone

        if self.process.stdin is not None:
            self.process.stdin.close()
        if graceful:
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                pass
        stop(self.process)
        self._log.close()

    def __enter__(self) -> OfflineRounds:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    if sys.argv[2] == "--rounds-on-stdin":
        serve_rounds(spec)
    else:
        Path(sys.argv[2]).write_text(json.dumps(run(spec)))


if __name__ == "__main__":
    main()
