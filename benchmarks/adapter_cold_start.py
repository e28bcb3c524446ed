"""Cold start of an adapter, split into resolve, download, engine load and first token; then warm TTFT.

Runs entirely on this machine: a Hub-protocol server on loopback (tests/support/fake_hub.py) serves
adapters made with peft against the embedded model; loraserve downloads them through the real
huggingface_hub client (HF_ENDPOINT). Prints the figures and saves them as JSON in benchmarks/results/.

    .venv/bin/python benchmarks/adapter_cold_start.py [--adapters 3] [--warm 5]
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

import httpx
from openai import OpenAI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _results  # noqa: E402
from tests.support.adapters import make_lora_adapter  # noqa: E402
from tests.support.fake_hub import FakeHub  # noqa: E402
from tests.support.server import free_port, wait_healthy  # noqa: E402

from loraserve.demo import embedded_model_dir  # noqa: E402

MESSAGES = [{"role": "user", "content": "What is the capital of Germany?"}]


def _ttft(client: OpenAI, model: str) -> float:
    sent = time.monotonic()
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = time.monotonic() - sent
            stream.close()
            return first
    raise RuntimeError("no token came back")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", type=int, default=3)
    parser.add_argument("--warm", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="loraserve-bench-"))
    base = embedded_model_dir(Path.home() / ".cache" / "loraserve")
    with FakeHub() as hub:
        names = []
        for i in range(args.adapters):
            folder = make_lora_adapter(base, work / f"adapter-{i}", seed=100 + i)
            hub.add_repo(f"bench/adapter-{i}", folder)
            names.append(f"bench/adapter-{i}")
        port = free_port()
        command = [sys.executable, "-m", "loraserve", "serve", "--port", str(port),
                   "--adapter-cache-dir", str(work / "cache")]  # fmt: skip
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(work / "hf")}
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, timeout_s=600)
            client = OpenAI(base_url=f"{url}/v1", api_key="unused")
            _ttft(client, "")  # warm the engine itself
            base_ttft = [_ttft(client, "") for _ in range(args.warm)]
            adapters = []
            for name in names:
                cold = _ttft(client, name)
                row = next(r for r in httpx.get(f"{url}/v1/adapters").json()["data"] if r["id"] == name)
                warm = [_ttft(client, name) for _ in range(args.warm)]
                adapters.append(
                    {
                        "adapter": name,
                        "size_bytes": row["size_bytes"],
                        "cold_ttft_s": cold,
                        "resolve_s": row["resolve_seconds"],
                        "download_s": row["download_seconds"],
                        "engine_load_s": row["load_seconds"],
                        "warm_ttft_median_s": statistics.median(warm),
                    }
                )
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)
    result = {
        "base_warm_ttft_median_s": statistics.median(base_ttft),
        "adapters": adapters,
    }
    print(json.dumps(result, indent=2))
    print(_results.save("adapter_cold_start", result))


if __name__ == "__main__":
    main()
