"""Fast tests of the HTTP layer: the real app, a fake engine, a tiny real tokenizer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraserve.app import create_app
from loraserve.config import Settings
from loraserve.engine import CompletionDelta, EngineDead, EngineRejected, LoraTarget, SamplingOptions

WORDS = ["<unk>", "<|im_start|>", "<|im_end|>", "user", "assistant", "system", "hello", "world", "the", "end", "\n"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer_dir(path: Path, chat_template: str | None) -> Path:
    vocab = {word: i for i, word in enumerate(WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", eos_token="<|im_end|>", bos_token="<|im_start|>"
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)
    return path


@dataclass
class FakeEngine:
    """Honours the Engine protocol; answers "hello world hello world …"."""

    max_model_len: int = 64
    max_lora_rank: int = 16
    loras: dict[int, LoraTarget] = field(default_factory=dict)
    reject_loras: bool = False
    words: list[str] = field(default_factory=lambda: ["hello", " world"])
    fail_with: Exception | None = None
    fail_after: int | None = None
    delay: float = 0.0
    healthy: bool = True
    calls: list[tuple[str, list[int], SamplingOptions, LoraTarget | None]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    finished: list[str] = field(default_factory=list)
    running: set[str] = field(default_factory=set)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], options: SamplingOptions, lora: LoraTarget | None = None
    ) -> AsyncGenerator[CompletionDelta, None]:
        self.calls.append((request_id, prompt_token_ids, options, lora))
        if self.fail_with is not None and self.fail_after is None:
            raise self.fail_with
        self.running.add(request_id)
        completed = False
        text = ""
        try:
            for i in range(options.max_tokens):
                if self.fail_with is not None and self.fail_after == i:
                    raise self.fail_with
                await asyncio.sleep(self.delay)
                piece = self.words[i % len(self.words)]
                text += piece
                hit = next((s for s in options.stop if s in text), None)
                if hit is not None:
                    completed = True
                    yield CompletionDelta(piece[: max(0, len(piece) - len(hit))], [i], "stop")
                    return
                last = i == options.max_tokens - 1
                completed = last
                yield CompletionDelta(piece, [i], "length" if last else None)
        finally:
            self.running.discard(request_id)
            (self.finished if completed else self.aborted).append(request_id)

    async def add_lora(self, lora: LoraTarget) -> None:
        if self.reject_loras:
            raise EngineRejected("unsupported adapter")
        self.loras[lora.int_id] = lora

    async def remove_lora(self, int_id: int) -> None:
        self.loras.pop(int_id, None)

    async def check_health(self) -> None:
        if not self.healthy:
            raise EngineDead("down")

    def num_running_requests(self) -> int:
        return len(self.running)

    async def shutdown(self) -> None:
        return None


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return make_tokenizer_dir(tmp_path / "tiny", CHATML)


@pytest.fixture
def settings(model_dir: Path, tmp_path: Path) -> Settings:
    return Settings(
        model=str(model_dir), served_model_name="tiny", cache_dir=tmp_path / "cache", max_request_bytes=4096
    )


@pytest.fixture
def client(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as test_client:
        yield test_client


__all__ = ["EngineRejected", "FakeEngine", "make_tokenizer_dir"]
