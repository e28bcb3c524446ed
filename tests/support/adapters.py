"""Real LoRA adapters made with peft, for tests that need vLLM to load (and visibly apply) an adapter.

The adapters are untrained: ``init_lora_weights=False`` leaves both A and B with nn.Linear's random init (B is zero
with the default init, which would make the adapter a no-op), so a seed alone decides the weights and different seeds
give different greedy outputs.

Speed: the base model is loaded once per path and cached; each adapter wraps it with ``get_peft_model``, saves, then
``unload()`` strips the LoRA layers again, which restores the base bit-for-bit. That measured ~0.2 s per adapter on
SmolLM2-135M versus ~0.45 s for a fresh load and ~0.9 s for a deep copy.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

_BASES: dict[Path, Any] = {}
# The cached base is mutated while an adapter is being made, so two adapters must not be made at once.
_LOCK = threading.Lock()


def _base_model(base_dir: Path) -> Any:
    key = base_dir.resolve()
    if key not in _BASES:
        _BASES[key] = AutoModelForCausalLM.from_pretrained(key, dtype=torch.float32).eval()
    return _BASES[key]


def make_tokenizer_only_template(base_dir: Path, out_dir: Path, chat_template: str) -> None:
    """Save the base tokenizer into ``out_dir`` with ``chat_template`` (written as ``chat_template.jinja``)."""
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    tokenizer.chat_template = chat_template
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)


def make_lora_adapter(
    base_dir: Path,
    out_dir: Path,
    *,
    seed: int,
    r: int = 8,
    target_modules: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    base_name: str | None = None,
    chat_template: str | None = None,
    pickle_only: bool = False,
    scale: float = 1.0,
) -> Path:
    """Write a random, seed-determined LoRA adapter for the model in ``base_dir`` to ``out_dir`` and return it.

    ``base_name`` goes into ``adapter_config.json`` as ``base_model_name_or_path`` (default ``str(base_dir)``);
    ``chat_template`` also saves the base tokenizer with that template, so the adapter ships its own;
    ``pickle_only`` writes ``adapter_model.bin`` instead of ``adapter_model.safetensors``;
    ``scale`` multiplies every lora_B weight (0 gives a no-op adapter, larger values a stronger effect).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False, task_type="CAUSAL_LM"
    )
    with _LOCK:
        model = _base_model(base_dir)
        # fork_rng: seed the LoRA init without disturbing the caller's global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
        try:
            if scale != 1.0:
                with torch.no_grad():
                    for name, parameter in peft_model.named_parameters():
                        if "lora_B" in name:
                            parameter.mul_(scale)
            peft_model.save_pretrained(str(out_dir), safe_serialization=not pickle_only)
        finally:
            # Strip the LoRA layers in place so the cached base is clean for the next adapter.
            peft_model.unload()
    # peft writes the path the base was loaded from; tests want to control what the server sees.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text())
    adapter_config["base_model_name_or_path"] = base_name if base_name is not None else str(base_dir)
    config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
    if chat_template is not None:
        make_tokenizer_only_template(base_dir, out_dir, chat_template)
    return out_dir


def make_peft_merge(
    base_dir: Path,
    adapters: Sequence[Path],
    weights: Sequence[float],
    out_dir: Path,
    combination_type: str = "linear",
    density: float | None = None,
) -> Path:
    """The reference merge: peft's own ``add_weighted_adapter`` over ``adapters``, saved as one adapter."""
    from peft import PeftModel

    with _LOCK:
        model = _base_model(base_dir)
        peft_model = PeftModel.from_pretrained(model, str(adapters[0]), adapter_name="a0")
        try:
            names = ["a0"]
            for i, folder in enumerate(adapters[1:], start=1):
                peft_model.load_adapter(str(folder), adapter_name=f"a{i}")
                names.append(f"a{i}")
            extra = {"density": density} if density is not None else {}
            peft_model.add_weighted_adapter(names, list(weights), "merged", combination_type=combination_type, **extra)
            peft_model.save_pretrained(str(out_dir), selected_adapters=["merged"])
        finally:
            peft_model.unload()
    saved = out_dir / "merged"  # peft saves an adapter that is not "default" in a folder of its name
    config_path = saved / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(base_dir)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return saved
