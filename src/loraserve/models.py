"""Which model a request's `model` field names. Never falls back to the base silently."""

from __future__ import annotations

import time
from dataclasses import dataclass

from loraserve.base_model import BaseModel
from loraserve.engine import LoraTarget
from loraserve.errors import ModelNotFound
from loraserve.protocol.responses import ModelCard


@dataclass(frozen=True)
class ModelTarget:
    requested: str
    lora: LoraTarget | None = None


class ModelCatalog:
    def __init__(self, base: BaseModel, max_model_len: int) -> None:
        self._base = base
        self._max_model_len = max_model_len
        self._created = int(time.time())

    @property
    def base(self) -> BaseModel:
        return self._base

    def resolve(self, requested: str) -> ModelTarget:
        if requested in self._base.names():
            return ModelTarget(requested)
        raise ModelNotFound(requested)

    def cards(self) -> list[ModelCard]:
        return [
            ModelCard(
                id=self._base.served_name,
                created=self._created,
                root=self._base.source,
                max_model_len=self._max_model_len,
            )
        ]
