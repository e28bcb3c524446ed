"""Fast tests of the HTTP layer: the real app, a fake engine, a tiny real tokenizer."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loraserve.app import create_app
from loraserve.config import Settings
from loraserve.engine import CompletionDelta, EngineDead, EngineRejected, LoraTarget, SamplingOptions, TokenLogprob

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
    dtype: str = "float32"
    device_type: str = "cpu"
    loras: dict[int, LoraTarget] = field(default_factory=dict)
    reject_loras: bool = False
    # send_lora returns before add_lora's answer, as VllmEngine's does with EngineCore's guard, and requests
    # then wait for the answer before their first delta; the answer takes ``lora_answer_delay`` seconds.
    pipeline_loras: bool = False
    lora_answer_delay: float = 0.0
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
        """Each of the n choices says the words in turn (choice i starts i words later)."""
        self.calls.append((request_id, prompt_token_ids, options, lora))
        if lora is not None and lora.loaded is not None:
            await asyncio.shield(lora.loaded)  # the refusal, if the engine refused the adapter
        if self.fail_with is not None and self.fail_after is None:
            raise self.fail_with
        self.running.add(request_id)
        completed = False
        texts = [""] * options.n
        done = [False] * options.n
        first = True
        try:
            for step in range(options.max_tokens):
                if self.fail_with is not None and self.fail_after == step:
                    raise self.fail_with
                await asyncio.sleep(self.delay)
                for choice in range(options.n):
                    if done[choice]:
                        continue
                    piece = self.words[(step + choice) % len(self.words)]
                    texts[choice] += piece
                    reason = "length" if step == options.max_tokens - 1 else None
                    hit = next((s for s in options.stop if s in texts[choice]), None)
                    stop_reason = None
                    if hit is not None:
                        piece, reason, stop_reason = piece[: max(0, len(piece) - len(hit))], "stop", hit
                    done[choice] = reason is not None
                    logprobs = None
                    if options.logprobs is not None:
                        top = tuple((t, f"alt{t}", -1.0 - t) for t in range(options.logprobs))
                        logprobs = [TokenLogprob(step, piece, -0.5 - choice, top)]
                    prompt_logprobs = None
                    if first and options.prompt_logprobs is not None:
                        prompt_logprobs = [None] + [TokenLogprob(t, f"p{t}", -2.0) for t in prompt_token_ids[1:]]
                    yield CompletionDelta(
                        piece, [step], reason, index=choice, logprobs=logprobs,
                        prompt_logprobs=prompt_logprobs, cumulative_logprob=-0.5 * (step + 1) * (choice + 1),
                        stop_reason=stop_reason,
                    )  # fmt: skip
                first = False
                if all(done):
                    completed = True
                    return
        finally:
            self.running.discard(request_id)
            (self.finished if completed else self.aborted).append(request_id)

    async def add_lora(self, lora: LoraTarget) -> None:
        if self.lora_answer_delay:
            await asyncio.sleep(self.lora_answer_delay)
        if self.reject_loras:
            raise EngineRejected("unsupported adapter")
        self.loras[lora.int_id] = lora

    async def send_lora(self, lora: LoraTarget) -> asyncio.Future[None]:
        if not self.pipeline_loras:
            await self.add_lora(lora)
            answer: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            answer.set_result(None)
            return answer
        return asyncio.ensure_future(self.add_lora(lora))

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


OWN_TEMPLATE = "{% for m in messages %}system {{ m['content'] }} the end{% endfor %}"


@pytest.fixture
def adapter_root(tmp_path: Path) -> Path:
    """Local adapters for the tiny base: a plain one, one with its own template, one for missing modules."""
    from tests.unit.adapters.helpers import write_adapter

    root = tmp_path / "adapters"
    write_adapter(root / "plain")
    write_adapter(root / "templated", chat_template=OWN_TEMPLATE)
    write_adapter(root / "wrong", modules=("gate_proj",))
    return root


@pytest.fixture
def adapter_settings(model_dir: Path, adapter_root: Path, tmp_path: Path) -> Settings:
    from tests.unit.adapters.helpers import write_base

    write_base(model_dir)
    return Settings(
        model=str(model_dir), served_model_name="tiny", cache_dir=tmp_path / "cache", adapter_dir=[adapter_root]
    )


@pytest.fixture
def adapter_client(adapter_settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(adapter_settings, engine=engine)) as client:
        yield client


@pytest.fixture
def client(settings: Settings, engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(settings, engine=engine), raise_server_exceptions=False) as test_client:
        yield test_client


__all__ = ["EngineRejected", "FakeEngine", "make_tokenizer_dir"]


@pytest.fixture
def punica_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    """vLLM's CPU punica module with loraserve's ``lora_fix.apply()`` run in this process; every op binding and the
    wrapper's methods are restored afterwards."""
    pytest.importorskip("vllm")
    from loraserve.engine import lora_fix

    module = importlib.import_module("vllm.lora.punica_wrapper.punica_cpu")
    for name, mod in list(sys.modules.items()):
        for op in lora_fix.CORRECTED:
            if name.startswith("vllm") and mod is not None and op in vars(mod):
                monkeypatch.setattr(mod, op, vars(mod)[op])  # records the binding for teardown
    for method in ("update_metadata", "add_lora_linear"):  # apply() also plans the wrapper's linear layers
        monkeypatch.setattr(module.PunicaWrapperCPU, method, getattr(module.PunicaWrapperCPU, method))
    manager = importlib.import_module(lora_fix.MODEL_MANAGER).LoRAModelManager  # ... and follows slot writes
    monkeypatch.setattr(manager, "activate_adapter", manager.activate_adapter)
    monkeypatch.setattr(lora_fix, "_applied", False)
    monkeypatch.setattr(lora_fix, "_uses_torch_ops", lambda: True)  # whatever platform runs the tests
    lora_fix.apply()
    yield module
