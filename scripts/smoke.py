"""Smoke test of a user's install: start `loraserve serve` as a new user would and talk to it over plain HTTP.

Run it with the Python of the environment under test, which holds only what
the user's install put there (``make install``, or ``pip install ".[cpu]"``),
never the test extras:

    .venv/bin/python scripts/smoke.py

Standard library only, plus numpy and safetensors (both runtime dependencies)
to write a small LoRA adapter. A fresh, empty ``--cache-dir`` makes the
embedded model's conversion really run. Steps:

1. every third-party module that loraserve's source imports, also the ones
   imported only at first use (S3, Hub, conversion), imports here;
2. the server starts and ``/health`` turns 200;
3. a chat answers "Berlin"; a streamed completion is well-formed SSE ending in
   ``[DONE]``; a forced tool call (structured output) parses; a local adapter
   answers through the adapter path (disk cache, validation, LoRARequest);
4. SIGTERM during a stream lets the stream finish (400 tokens, [DONE]), new
   requests are refused, the server and all its processes exit, and the log
   of this normal start and stop holds no error.

Exit status 0 when every step passed; otherwise 1, with the server log's tail.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "src" / "loraserve"
ADAPTER_NAME = "smoke-lora"
STREAM_TOKENS = 400


class SmokeFailure(Exception):
    pass


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def third_party_imports(source: Path) -> list[str]:
    """Every module loraserve's source imports that is neither loraserve's own nor the standard library."""
    found: set[str] = set()
    for file in sorted(source.rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text(), filename=str(file))):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module)
    return sorted(
        name
        for name in found
        if name.split(".")[0] not in sys.stdlib_module_names and name.split(".")[0] != "loraserve"
    )


def check_imports() -> None:
    # As the server does at start: PyPI's torchvision beside a CPU torch must not break transformers.
    from loraserve.torch_extras import hide_unloadable

    hide_unloadable()
    failed = []
    for name in third_party_imports(SOURCE):
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - report every failure, not just the first
            failed.append(f"{name}: {type(exc).__name__}: {exc}")
    check(not failed, "modules loraserve imports are missing from this install:\n  " + "\n  ".join(failed))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def post(url: str, body: dict[str, Any], timeout: float = 120) -> tuple[int, bytes]:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def post_json(url: str, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = post(url, body)
    check(status == 200, f"POST {url} answered {status}: {raw[:500]!r}")
    answer: dict[str, Any] = json.loads(raw)
    return answer


def sse_events(raw: bytes) -> Iterator[str]:
    for line in raw.decode().splitlines():
        if line.startswith("data: "):
            yield line[len("data: ") :]


def wait_healthy(base: str, server: subprocess.Popen[bytes], timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        check(server.poll() is None, f"the server exited with status {server.returncode} before it was healthy")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                if response.status == 200:
                    return time.monotonic() - started
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise SmokeFailure(f"/health did not answer 200 within {timeout_s:.0f} s")


def write_zero_lora(model_dir: Path, out: Path) -> None:
    """A rank-8 LoRA on every q_proj, in peft's file format, whose B is zero: it runs, and changes nothing."""
    import numpy as np
    from safetensors import safe_open
    from safetensors.numpy import save_file

    tensors: dict[str, Any] = {}
    rank = 8
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="numpy") as handle:
            for key in handle.keys():
                if key.endswith("self_attn.q_proj.weight"):
                    out_features, in_features = handle.get_slice(key).get_shape()
                    module = key[: -len(".weight")]
                    tensors[f"base_model.model.{module}.lora_A.weight"] = (
                        np.random.default_rng(0).standard_normal((rank, in_features)).astype(np.float32) * 0.01
                    )
                    tensors[f"base_model.model.{module}.lora_B.weight"] = np.zeros((out_features, rank), np.float32)
    check(bool(tensors), f"no q_proj weights found in {model_dir}")
    out.mkdir(parents=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "lora_dropout": 0.0,
        "target_modules": ["q_proj"],
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    (out / "adapter_config.json").write_text(json.dumps(config))


def chat_answers_berlin(v1: str, model: str = "", **extra: Any) -> None:
    answer = post_json(
        f"{v1}/chat/completions",
        {
            "model": model,
            "messages": [{"role": "user", "content": "What is the capital of Germany?"}],
            "max_tokens": 16,
            "temperature": 0,
            **extra,
        },
    )
    content = answer["choices"][0]["message"]["content"]
    check("Berlin" in content, f"chat through {model or 'the base'} answered {content!r}, expected Berlin")


def streamed_completion_is_well_formed(v1: str) -> None:
    status, raw = post(
        f"{v1}/completions",
        {"model": "", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0, "stream": True},
    )
    check(status == 200, f"streamed completion answered {status}: {raw[:500]!r}")
    events = list(sse_events(raw))
    check(events[-1:] == ["[DONE]"], f"the stream did not end with [DONE]: {events[-2:]}")
    chunks = [json.loads(event) for event in events[:-1]]
    check(all("error" not in chunk for chunk in chunks), f"the stream carried an error: {chunks}")
    text = "".join(chunk["choices"][0]["text"] for chunk in chunks if chunk["choices"])
    check("Paris" in text, f"streamed completion answered {text!r}, expected Paris")
    check(chunks[-1]["choices"][0]["finish_reason"] == "length", f"last chunk: {chunks[-1]}")


def forced_tool_call_parses(v1: str) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
    answer = post_json(
        f"{v1}/chat/completions",
        {
            "model": "",
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [tool],
            "tool_choice": "required",
            "max_tokens": 48,
            "temperature": 0,
        },
    )
    calls = answer["choices"][0]["message"]["tool_calls"]
    check(bool(calls) and calls[0]["function"]["name"] == "get_weather", f"tool call: {answer}")
    check("city" in json.loads(calls[0]["function"]["arguments"]), f"tool arguments: {calls[0]}")


def sigterm_lets_a_running_stream_finish(v1: str, server: subprocess.Popen[bytes]) -> None:
    """SIGTERM mid-stream: the stream still ends with its finish_reason and [DONE], then the server exits."""
    # Longer than uvicorn's own grace period (it used to cut such a stream after 5 s without [DONE]).
    body = {"model": "", "prompt": "Once upon a time", "max_tokens": STREAM_TOKENS, "temperature": 0,
            "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}  # fmt: skip
    request = urllib.request.Request(
        f"{v1}/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    first_chunk = threading.Event()
    events: list[str] = []

    def read() -> None:
        with urllib.request.urlopen(request, timeout=120) as response:
            for raw in response:
                line = raw.decode().strip()
                if line.startswith("data: "):
                    events.append(line[len("data: ") :])
                    first_chunk.set()
        first_chunk.set()

    reader = threading.Thread(target=read)
    reader.start()
    check(first_chunk.wait(60), "the stream sent nothing")
    server.send_signal(signal.SIGTERM)
    reader.join(120)
    check(events[-1:] == ["[DONE]"], f"the stream did not end with [DONE]: {events[-3:]}")
    chunks = [json.loads(event) for event in events[:-1]]
    check(all("error" not in chunk for chunk in chunks), f"the stream was cut: {chunks[-1]}")
    # Counted by the usage chunk: a busy engine may hand over two tokens in one chunk.
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1]
    generated = chunks[-1].get("usage", {}).get("completion_tokens")
    check(finish == "length" and generated == STREAM_TOKENS, f"finish {finish!r} after {generated} tokens")
    try:
        status, _ = post(f"{v1}/completions", {"model": "", "prompt": "x", "max_tokens": 1}, timeout=10)
        check(status == 503, f"a new request while stopping answered {status}, not 503")
    except (urllib.error.URLError, OSError):
        pass  # the listening socket is closed already: refused, as wanted
    try:
        server.wait(60)
    except subprocess.TimeoutExpired as exc:
        raise SmokeFailure("the server did not exit within 60 s of SIGTERM") from exc


def log_is_clean(log: Path) -> None:
    lines = log.read_text(errors="replace").splitlines()
    bad = [line for line in lines if " ERROR " in line or "Traceback" in line or line.startswith("ERROR")]
    check(not bad, "a normal start and stop logged errors:\n  " + "\n  ".join(bad[:20]))


def stop(server: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    """SIGTERM, then the whole process group with SIGKILL if it lingers (vLLM's processes included)."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout_s)
        except subprocess.TimeoutExpired:
            print(f"     the server did not stop within {timeout_s:.0f} s of SIGTERM; killing its processes")
    server.wait()
    deadline = time.monotonic() + 10  # vLLM's helpers (resource tracker, workers) follow within moments
    try:
        while time.monotonic() < deadline:
            os.killpg(server.pid, 0)
            time.sleep(0.2)
        os.killpg(server.pid, signal.SIGKILL)
        print("     processes of the server's group outlived it by 10 s; killed them")
    except ProcessLookupError:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loraserve", default=str(Path(sys.executable).with_name("loraserve")))
    parser.add_argument("--startup-timeout", type=float, default=900)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="loraserve-smoke.") as tmp:
        work = Path(tmp)
        cache_dir, adapter_root, log = work / "cache", work / "adapters", work / "server.log"
        adapter_root.mkdir()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        v1 = f"{base}/v1"
        command = [args.loraserve, "serve", "--port", str(port), "--cache-dir", str(cache_dir)]
        command += ["--adapter-dir", str(adapter_root)]
        steps: list[tuple[str, Callable[[], Any]]] = [
            ("chat on the base model answers Berlin", lambda: chat_answers_berlin(v1)),
            ("streamed completion is well-formed SSE", lambda: streamed_completion_is_well_formed(v1)),
            ("forced tool call (structured output) parses", lambda: forced_tool_call_parses(v1)),
            (
                "chat through a local adapter answers Berlin",
                lambda: chat_answers_berlin(v1, ADAPTER_NAME, adapter_source="local"),
            ),
        ]
        server: subprocess.Popen[bytes] | None = None
        try:
            started = time.monotonic()
            check_imports()
            print(f"ok   every module loraserve imports is installed ({time.monotonic() - started:.1f} s)")
            print(f"...  {' '.join(command)}")
            with log.open("wb") as sink:
                server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
            print(f"ok   /health is 200 after {wait_healthy(base, server, args.startup_timeout):.0f} s")
            write_zero_lora(cache_dir / "models" / "SmolLM2-135M-Instruct", adapter_root / ADAPTER_NAME)
            for name, step in steps:
                started = time.monotonic()
                step()
                print(f"ok   {name} ({time.monotonic() - started:.1f} s)")
            started = time.monotonic()
            sigterm_lets_a_running_stream_finish(v1, server)
            stop(server)
            server = None
            elapsed = time.monotonic() - started
            print(f"ok   SIGTERM mid-stream: the stream finished, the server exited {elapsed:.1f} s later")
            log_is_clean(log)
            print("ok   a normal start and stop logged no error")
        except SmokeFailure as failure:
            print(f"FAIL {failure}")
            if log.exists():
                print("---- server log (tail) ----")
                print(log.read_text(errors="replace")[-8000:])
            return 1
        finally:
            if server is not None:
                stop(server)
    print("smoke: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
