"""One real server per test run: loraserve + vLLM on this machine + the embedded model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from openai import OpenAI

from loraserve.demo import embedded_model_dir
from tests.support.adapters import make_lora_adapter
from tests.support.fake_hub import FakeHub
from tests.support.server import free_port, wait_healthy

STARTUP_TIMEOUT_S = 420
PRIVATE_TOKEN = "hf_private_e2e_token"
OWN_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | upper }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class RunningServer:
    url: str
    log: Path
    model_dir: Path
    hub: FakeHub
    adapters: dict[str, Path]  # hub repo id or local name -> the folder it was made from
    pid: int  # the server's process, which leads the process group of everything it starts

    @property
    def v1(self) -> str:
        return f"{self.url}/v1"

    def client(self) -> OpenAI:
        return OpenAI(base_url=self.v1, api_key="unused", max_retries=0, timeout=120)


def _make_adapters(base: Path, work: Path, hub: FakeHub) -> dict[str, Path]:
    made: dict[str, Path] = {}

    def publish(repo: str, seed: int, **kwargs: object) -> None:
        folder = make_lora_adapter(base, work / repo.replace("/", "__"), seed=seed, **kwargs)  # type: ignore[arg-type]
        private = repo.endswith("private")
        hub.add_repo(repo, folder, private=private, token=PRIVATE_TOKEN if private else None)
        made[repo] = folder

    publish("acme/voice", 1, base_name="HuggingFaceTB/SmolLM2-135M-Instruct")
    publish("acme/own-template", 2, chat_template=OWN_TEMPLATE)
    publish("acme/private", 3)
    publish("acme/concurrent", 4)
    publish("acme/pickled", 5, pickle_only=True)
    publish("acme/rank-32", 6, r=32)
    publish("acme/single-flight", 9)  # only the single-flight test asks for it: it must be cold there
    # Also targets the MLP: an adapter that follows it into a LoRA slot must find the MLP layers zeroed.
    publish(
        "acme/mlp", 11, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    )
    # Passes loraserve's checks, but vLLM refuses it when loading: its requests are already on their way then.
    refused = make_lora_adapter(base, work / "acme__bias", seed=10)
    config = json.loads((refused / "adapter_config.json").read_text())
    (refused / "adapter_config.json").write_text(json.dumps({**config, "bias": "all"}))
    hub.add_repo("acme/bias", refused)
    made["acme/bias"] = refused
    local = make_lora_adapter(base, work / "local" / "team" / "local-a", seed=7)
    made["team/local-a"] = local
    made["s3://loras/team/s3-a"] = make_lora_adapter(base, work / "s3-a", seed=8)
    return made


_AWS = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def _start_s3(folder: Path) -> tuple[ThreadedMotoServer, str]:
    """moto's S3-compatible server on loopback, holding one adapter under s3://loras/team/s3-a."""
    port = free_port()
    s3 = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    s3.start()
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, **{k.lower(): v for k, v in _AWS.items() if "KEY" in k})
    client.create_bucket(Bucket="loras")
    for path in folder.iterdir():
        client.upload_file(str(path), "loras", f"team/s3-a/{path.name}")
    return s3, endpoint


@dataclass(frozen=True)
class _World:
    """What every test server shares: the base model, a Hub-protocol server, S3, the adapters."""

    cache: Path
    model_dir: Path
    work: Path
    hub: FakeHub
    s3_endpoint: str
    adapters: dict[str, Path]


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_World]:
    cache = Path(os.environ.get("LORASERVE_CACHE_DIR", Path.home() / ".cache" / "loraserve"))
    model_dir = embedded_model_dir(cache)
    work = tmp_path_factory.mktemp("e2e")
    hub = FakeHub()
    hub.start()
    adapters = _make_adapters(model_dir, work / "adapters", hub)
    s3, s3_endpoint = _start_s3(adapters["s3://loras/team/s3-a"])
    try:
        yield _World(cache, model_dir, work, hub, s3_endpoint, adapters)
    finally:
        hub.stop()
        s3.stop()


@contextmanager
def _serve(world: _World, name: str, extra: list[str]) -> Iterator[RunningServer]:
    port = free_port()
    log = world.work / f"{name}.log"
    # fp32 keeps greedy decoding deterministic; small sizes keep the test machine free.
    command = [
        sys.executable, "-m", "loraserve", "serve", "--port", str(port), "--cache-dir", str(world.cache),
        "--adapter-cache-dir", str(world.work / f"{name}-adapter-cache"),
        "--adapter-dir", str(world.work / "adapters" / "local"),
        "--dtype", "float32", "--max-model-len", "2048", "--max-num-seqs", "32", *extra,
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(HF_ENDPOINT=world.hub.url, HF_HOME=str(world.work / "hf-home"), HF_HUB_DISABLE_TELEMETRY="1")
    env.update(_AWS, AWS_ENDPOINT_URL=world.s3_endpoint)
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, STARTUP_TIMEOUT_S, log)
        yield RunningServer(url, log, world.model_dir, world.hub, world.adapters, process.pid)
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="session")
def server(world: _World) -> Iterator[RunningServer]:
    """The server most tests share: loraserve's defaults (--max-loras 4, prefix caching on)."""
    with _serve(world, "server", []) as running:
        yield running


@pytest.fixture(scope="session")
def server_one_lora(world: _World) -> Iterator[RunningServer]:
    """The other corner of the batching matrix: one LoRA slot, no prefix caching."""
    with _serve(world, "server-one-lora", ["--max-loras", "1", "--no-enable-prefix-caching"]) as running:
        yield running


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.path):
            item.add_marker(pytest.mark.e2e)
