"""Tiny base models and adapters as safetensors files, without peft, for fast checks."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

HIDDEN = 8


def write_base(folder: Path, layers: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            tensors[f"model.layers.{i}.self_attn.{name}.weight"] = torch.zeros(HIDDEN, HIDDEN)
    save_file(tensors, str(folder / "model.safetensors"))
    return folder


def write_adapter(
    folder: Path,
    *,
    rank: int = 4,
    modules: tuple[str, ...] = ("q_proj", "v_proj"),
    in_features: int = HIDDEN,
    pickle_only: bool = False,
    base_name: str = "base",
    chat_template: str | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"peft_type": "LORA", "r": rank, "target_modules": list(modules), "base_model_name_or_path": base_name}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    tensors = {}
    for i in range(2):
        for name in modules:
            prefix = f"base_model.model.model.layers.{i}.self_attn.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.ones(rank, in_features)
            tensors[f"{prefix}.lora_B.weight"] = torch.ones(HIDDEN, rank)
    if pickle_only:
        torch.save(tensors, folder / "adapter_model.bin")
    else:
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    if chat_template is not None:
        (folder / "chat_template.jinja").write_text(chat_template)
    return folder
