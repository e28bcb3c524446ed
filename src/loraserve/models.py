"""Which model a request's `model` field names. Never falls back to the base silently."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from loraserve.adapters.ref import SourceKind
from loraserve.adapters.registry import AdapterLease, AdapterRegistry
from loraserve.base_model import BaseModel
from loraserve.engine import LoraTarget
from loraserve.errors import ModelNotFound
from loraserve.protocol.responses import ModelCard
from loraserve.templates import ChatFormat


@dataclass
class ModelTarget:
    requested: str
    name: str  # the model that answers, as responses report it: the served base name, or the adapter's
    chat: ChatFormat
    lora: LoraTarget | None = None
    lease: AdapterLease | None = None

    def release(self) -> None:
        """End the request's hold on its adapter; safe to call more than once."""
        if self.lease is not None:
            self.lease.release()


class ModelCatalog:
    def __init__(
        self, base: BaseModel, max_model_len: int, base_chat: ChatFormat, adapters: AdapterRegistry | None
    ) -> None:
        self._base = base
        self._max_model_len = max_model_len
        self._base_chat = base_chat
        self._adapters = adapters
        self._created = int(time.time())

    @property
    def base(self) -> BaseModel:
        return self._base

    async def resolve(self, requested: str, source: SourceKind = "hub", token: str | None = None) -> ModelTarget:
        if requested in self._base.names():
            return ModelTarget(requested, self._base.served_name, self._base_chat)
        if self._adapters is None:
            raise ModelNotFound(requested)
        lease = await self._adapters.acquire(requested, source, token)
        loaded = lease.loaded
        return ModelTarget(requested, requested, loaded.chat or self._base_chat, loaded.target, lease)

    def adapter_status(self) -> dict[str, Any]:
        if self._adapters is None:
            return {"cache": None, "data": []}
        return {"cache": self._adapters.cache_summary(), "data": self._adapters.status()}

    def cards(self) -> list[ModelCard]:
        cards = [
            ModelCard(
                id=self._base.served_name,
                created=self._created,
                root=self._base.source,
                max_model_len=self._max_model_len,
            )
        ]
        if self._adapters is None:
            return cards
        newest: dict[str, ModelCard] = {}
        # Private adapters stay unlisted: listing them would tell anyone they exist.
        for entry in sorted(self._adapters.entries(), key=lambda e: e.last_used):
            if entry.public:
                newest[entry.ref.display()] = ModelCard(
                    id=entry.ref.display(),
                    created=int(entry.last_used),
                    root=entry.root,
                    parent=self._base.served_name,
                    max_model_len=self._max_model_len,
                )
        return cards + list(newest.values())
