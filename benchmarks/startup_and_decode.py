"""Engine start time and single-request decode speed of `loraserve serve`.

Starts the server (embedded model unless --model is given), times how long it
takes until /health answers, then sends greedy requests one at a time and
reports time to first token and output tokens per second. Prints the figures
and saves them as JSON under benchmarks/results/.

    .venv/bin/python benchmarks/startup_and_decode.py [--dtype float32] [--requests 3] [--max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.server import free_port, wait_healthy  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args, extra = parser.parse_known_args()
    port = free_port()
    command = [sys.executable, "-m", "loraserve", "serve", "--port", str(port), "--dtype", args.dtype, *extra]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, timeout_s=600)
        startup_s = time.monotonic() - started
        client = OpenAI(base_url=f"{url}/v1", api_key="unused")
        runs = []
        for _ in range(args.requests):
            sent = time.monotonic()
            first: float | None = None
            tokens = 0
            stream = client.chat.completions.create(
                model="",
                messages=[{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
                max_tokens=args.max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.monotonic()
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            done = time.monotonic()
            assert first is not None
            elapsed = done - sent
            runs.append({"ttft_s": first - sent, "tokens": tokens, "tok_per_s": tokens / elapsed, "total_s": elapsed})
        result = {
            "benchmark": "startup_and_decode",
            "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "dtype": args.dtype,
            "extra_args": extra,
            "startup_s": startup_s,
            "runs": runs,
        }
        print(json.dumps(result, indent=2))
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / f"startup_and_decode-{int(time.time())}.json").write_text(json.dumps(result, indent=2))
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


if __name__ == "__main__":
    main()
