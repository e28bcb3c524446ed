"""Engine start time and single-request decode speed of `loraserve serve`, on the base and through an adapter.

Starts the server (embedded model unless --model is given), times how long it
takes until /health answers, then sends greedy streamed requests one at a
time, alternating the base model and a rank-8 peft adapter (q/k/v/o) served
from a local folder, and reports for each the time to first token and the
decode speed (tokens after the first, per second). Prints the figures and
saves them as JSON under benchmarks/results/.

    .venv/bin/python benchmarks/startup_and_decode.py [--dtype float32] [--requests 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _results  # noqa: E402
from tests.support.adapters import make_lora_adapter  # noqa: E402
from tests.support.server import free_port, wait_healthy  # noqa: E402

from loraserve.demo import embedded_model_dir  # noqa: E402

ADAPTER = "bench-lora"


def _stream_once(client: OpenAI, model: str, max_tokens: int) -> dict[str, object]:
    sent = time.monotonic()
    first: float | None = None
    tokens = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True, "adapter_source": "local"},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic()
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    done = time.monotonic()
    assert first is not None
    return {
        "model": model or "base",
        "ttft_s": first - sent,
        "tokens": tokens,
        "decode_tok_per_s": (tokens - 1) / (done - first),
        "total_s": done - sent,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=5, help="per model, after one warm-up each")
    parser.add_argument("--max-tokens", type=int, default=64)
    args, extra = parser.parse_known_args()
    port = free_port()
    adapters = Path(tempfile.mkdtemp(prefix="bench-adapters."))
    model_dir = embedded_model_dir(Path.home() / ".cache" / "loraserve")
    make_lora_adapter(model_dir, adapters / ADAPTER, seed=1)
    command = [sys.executable, "-m", "loraserve", "serve", "--port", str(port), "--dtype", args.dtype, *extra]
    command += ["--adapter-dir", str(adapters)]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=600)
        startup_s = time.monotonic() - started
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        runs: list[dict[str, object]] = []
        for i in range(2 * args.requests + 2):
            model = ("", ADAPTER)[i % 2]
            run = _stream_once(client, model, args.max_tokens)
            if i >= 2:  # the first of each is a warm-up (the adapter's first load included)
                runs.append(run)
        summary = {}
        for label, recorded in (("base", "base"), ("adapter", ADAPTER)):
            mine = [r for r in runs if r["model"] == recorded]
            summary[label] = {
                "ttft_s_median": statistics.median(float(r["ttft_s"]) for r in mine),  # type: ignore[arg-type]
                "decode_tok_per_s_median": statistics.median(float(r["decode_tok_per_s"]) for r in mine),  # type: ignore[arg-type]
            }
        print(json.dumps(summary, indent=2))
        result = {
            "dtype": args.dtype,
            "extra_args": extra,
            "startup_s": startup_s,
            "summary": summary,
            "runs": runs,
        }
        print(json.dumps(result, indent=2))
        print(_results.save("startup_and_decode", result))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
