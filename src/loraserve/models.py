"""Which model a request's `model` field names. Never falls back to the base silently."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from transformers import PreTrainedTokenizerBase

from loraserve.adapters.merge import MergeSpec
from loraserve.adapters.named import NamedAdapters
from loraserve.adapters.ref import SourceKind
from loraserve.adapters.registry import AdapterRegistry
from loraserve.base_model import BaseModel
from loraserve.engine import LoraTarget
from loraserve.errors import EngineUnavailable, InvalidRequest, ModelNotFound
from loraserve.protocol.responses import ModelCard
from loraserve.templates import ChatFormat


@dataclass(frozen=True)
class ModelTarget:
    name: str  # the model that answers, as responses report it: the served base name, or the adapter's
    chat: ChatFormat
    lora: LoraTarget | None = None


class ModelCatalog:
    def __init__(
        self,
        base: BaseModel,
        max_model_len: int,
        base_chat: ChatFormat,
        adapters: AdapterRegistry | None,
        named: NamedAdapters | None = None,
    ) -> None:
        self._base = base
        self._max_model_len = max_model_len
        self._base_chat = base_chat
        self._adapters = adapters
        self._named = named
        self._created = int(time.time())

    @property
    def base(self) -> BaseModel:
        return self._base

    def base_tokenizer(self) -> PreTrainedTokenizerBase:
        return self._base_chat.tokenizer

    def named_adapters(self) -> NamedAdapters:
        if self._named is None:
            raise EngineUnavailable("This server was started without adapter support.")
        return self._named

    @asynccontextmanager
    async def resolve(
        self, requested: str, source: SourceKind = "hub", token: str | None = None, merged: MergeSpec | None = None
    ) -> AsyncIterator[ModelTarget]:
        """The model a request names, held for as long as the ``async with`` lasts.

        The one owner of an adapter's lease: it is taken here and released on exit, whatever
        happens in between, so no path can leak it or release it twice. An adapter loaded for this
        request may still be on its way into the engine: the request follows it (``LoraTarget.loaded``).
        """
        if merged is not None and requested not in self._base.names():
            raise InvalidRequest(
                '`merged_adapters` merges adapters of the base model: name the base (or "") in `model`.',
                param="merged_adapters",
            )
        if requested in self._base.names() and merged is None:
            yield ModelTarget(self._base.served_name, self._base_chat)
            return
        if self._adapters is None:
            raise ModelNotFound(requested)
        named = self._named.get(requested) if self._named is not None else None
        if merged is not None:
            lease = await self._adapters.acquire_merged(merged, source, token, wait=False)
            requested = lease.loaded.entry.ref.display()  # merged:<key>: what responses and metrics name
        elif named is not None and self._named is not None:
            # A name given through /v1/load_lora_adapter wins: it means that very snapshot, whatever the source.
            lease = await self._named.lease(named, wait=False)
        else:
            lease = await self._adapters.acquire(requested, source, token, wait=False)
        try:
            loaded = lease.loaded
            # The engine knows the adapter by its LoRA id; the name on each request is the one the client
            # sent, so vLLM's vllm:lora_requests_info reports names that routers match to `model` fields.
            lora = replace(loaded.target, name=requested)
            yield ModelTarget(requested, loaded.chat or self._base_chat, lora)
        finally:
            lease.release()

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
        for named in self._named.all() if self._named is not None else []:
            newest[named.name] = ModelCard(
                id=named.name,
                created=int(named.created),
                root=named.entry.root,  # not lora_path: a server's folders are nobody's business
                parent=self._base.served_name,
                max_model_len=self._max_model_len,
            )
        return cards + list(newest.values())
