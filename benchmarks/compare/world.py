"""The adapters and the Hub-protocol server both servers download them from.

Every adapter is a real peft LoRA (rank 8 on q/k/v/o) made against the served model folder, whose path is also
its ``base_model_name_or_path``: vLLM's Hub resolver accepts only adapters naming the served model exactly, and
loraserve accepts them because the shapes fit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.support.adapters import make_lora_adapter
from tests.support.fake_hub import FakeHub

ORG = "bench"
WEIGHTS = "adapter_model.safetensors"


@dataclass(frozen=True)
class Adapters:
    """Hub ids by the scenario that uses them. Every server starts on empty caches, so names repeat per start."""

    mixed: list[str]  # scenarios 1 and 2: the popular ones, most popular first
    cold: list[str]  # scenario 4: never requested before on a server
    flight: str  # scenario 5: the one adapter 16 clients ask for at once
    churn: list[str]  # scenario 6: more than the cache holds
    folder: Path  # where they were made: the offline engine loads them from here

    def all(self) -> list[str]:
        return [*self.mixed, *self.cold, self.flight, *self.churn]

    def path(self, repo: str) -> Path:
        return self.folder / repo.replace("/", "__")


def publish(hub: FakeHub, model_dir: Path, folder: Path, mixed: int, cold: int, churn: int) -> tuple[Adapters, int]:
    """Make the adapters in ``folder`` (the caller removes it: 0.7 GB for the full profile), commit each to its own
    repo on ``hub``; return their ids and one adapter's bytes."""
    adapters = Adapters(
        mixed=[f"{ORG}/mixed-{i}" for i in range(mixed)],
        cold=[f"{ORG}/cold-{i}" for i in range(cold)],
        flight=f"{ORG}/flight",
        churn=[f"{ORG}/churn-{i}" for i in range(churn)],
        folder=folder,
    )
    size = 0
    for seed, repo in enumerate(adapters.all(), start=1):
        made = make_lora_adapter(model_dir, adapters.path(repo), seed=seed)
        hub.add_repo(repo, made)
        size = sum(path.stat().st_size for path in made.iterdir())  # all the same size
    return adapters, size


def downloads(hub: FakeHub, repo: str) -> int:
    """Complete downloads of the adapter's weights the Hub has served so far."""
    return hub.completed[(repo, WEIGHTS)]
