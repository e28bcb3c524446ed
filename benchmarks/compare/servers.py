"""Starting and stopping each kind of server with the same engine flags, one at a time, on fresh caches.

Both servers get the same vLLM engine flags, spelled out (loraserve's defaults differ from vLLM's), the same
Hub-protocol server through HF_ENDPOINT and an empty HF_HOME, so every start begins with nothing downloaded.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tests.support.server import free_port, wait_healthy

Kind = Literal["loraserve", "vllm"]
STARTUP_TIMEOUT_S = 600


@dataclass(frozen=True)
class EngineFlags:
    """The vLLM engine flags both servers and the offline engine share."""

    dtype: str = "float32"  # fp32: as the outside measurement, and the dtype loraserve's tests pin
    max_model_len: int = 2048
    max_num_seqs: int = 32
    max_loras: int = 4
    max_lora_rank: int = 16
    max_cpu_loras: int = 8
    # On CPU the fraction of RAM for the KV cache, checked against the RAM free at start. loraserve's CPU default
    # (0.3) is 7 GiB here and fails when other work holds RAM; 0.1 is still hundreds of times what 32 short
    # requests need, so the figures do not depend on it.
    gpu_memory_utilization: float = 0.1

    def cli(self) -> list[str]:
        return [
            "--dtype", self.dtype, "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs), "--max-loras", str(self.max_loras),
            "--max-lora-rank", str(self.max_lora_rank), "--max-cpu-loras", str(self.max_cpu_loras),
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
        ]  # fmt: skip

    def kwargs(self) -> dict[str, object]:
        """The same flags as ``vllm.LLM`` keyword arguments."""
        return {
            "dtype": self.dtype,
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "enable_lora": True,
            "max_loras": self.max_loras,
            "max_lora_rank": self.max_lora_rank,
            "max_cpu_loras": self.max_cpu_loras,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }


@dataclass(frozen=True)
class Running:
    kind: Kind
    url: str
    base_name: str  # what the server calls its base model in the request's `model`
    adapter_disk: Path  # the folder its downloaded adapters land in
    startup_s: float  # from the process start until /health answered 200
    log: Path
    pgid: int  # its process group: the server and its engine processes


def command(kind: Kind, port: int, model_dir: Path, flags: EngineFlags, work: Path, cache_budget: int) -> list[str]:
    if kind == "loraserve":
        return [
            sys.executable, "-m", "loraserve", "serve", "--host", "127.0.0.1", "--port", str(port),
            "--model", str(model_dir), "--adapter-cache-dir", str(work / "adapters"),
            "--adapter-cache-size", str(cache_budget), *flags.cli(),
        ]  # fmt: skip
    return [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(model_dir), "--enable-lora", *flags.cli(),
    ]  # fmt: skip


def environment(kind: Kind, hub_url: str, work: Path, hub_repos: Sequence[str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "VLLM_PLUGINS")}
    env.update(HF_ENDPOINT=hub_url, HF_HOME=str(work / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    if kind == "vllm":
        # vLLM's own on-demand adapters: its Hub resolver over an allow-list, and runtime LoRA updates.
        # VLLM_PLUGINS names only the resolver, so loraserve's LoRA-op plugin (installed in the same
        # environment) stays out: this is vLLM as it ships.
        env.update(
            VLLM_PLUGINS="lora_hf_hub_resolver",
            VLLM_LORA_RESOLVER_HF_REPO_LIST=",".join(hub_repos),
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        )
    return env


def adapter_disk(kind: Kind, work: Path) -> Path:
    # vllm serve's resolver downloads with snapshot_download into the HF cache, and never deletes.
    return work / ("adapters" if kind == "loraserve" else "hf-home")


@contextmanager
def serve(
    kind: Kind,
    model_dir: Path,
    flags: EngineFlags,
    hub_url: str,
    hub_repos: Sequence[str],
    cache_budget: int,
    log: Path,
) -> Iterator[Running]:
    """Start one server on empty caches, yield it once healthy, stop it with its whole process group."""
    work = Path(tempfile.mkdtemp(prefix=f"bench-{kind}."))
    port = free_port()
    started = time.monotonic()
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command(kind, port, model_dir, flags, work, cache_budget),
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the engine's processes stop with it
            env=environment(kind, hub_url, work, hub_repos),
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, STARTUP_TIMEOUT_S, log)
        yield Running(kind, url, str(model_dir), adapter_disk(kind, work), time.monotonic() - started, log, process.pid)
    finally:
        stop(process)
        shutil.rmtree(work, ignore_errors=True)


def stop(process: subprocess.Popen[Any]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass
    _wait_group_gone(process.pid)


def _wait_group_gone(pgid: int, timeout_s: float = 30) -> None:
    """The next arm must not share the CPU or RAM with this one's engine processes: wait until they are gone."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def disk_bytes(folder: Path, skip: Callable[[str], bool] = lambda name: False) -> int:
    """Bytes of the regular files under ``folder`` whose names ``skip`` does not reject, each file (inode) once;
    symlinks (the HF cache's snapshots) are not followed. The walk races the server: a folder renamed from the
    cache's tmp/ into entries/ (or evicted the other way) while the walk runs is met on both sides, and summing both
    read two adapters over the budget that were never on disk twice; a folder gone meanwhile is passed over."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            if skip(name):
                continue
            try:
                stat = os.lstat(os.path.join(root, name))
            except OSError:  # removed while we looked
                continue
            if not os.path.islink(os.path.join(root, name)) and (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total
