"""Adapters loaded under a name of the caller's choosing: ``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Scripts written for ``vllm serve`` keep working. Loading fetches the adapter
through the same cache, checks and allow-list as a request would, loads it into
the engine and pins it. Unloading differs from vLLM's on purpose (vLLM #54839:
its unload only forgets the name): the name stops answering at once, requests
already running finish, then the LoRA leaves the engine and the cache entry is
unpinned (so it may be evicted like any other).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from loraserve.adapters.ref import SourceKind
from loraserve.adapters.registry import AdapterLease, AdapterRegistry
from loraserve.adapters.sources import LocalSource
from loraserve.adapters.store import CacheEntry
from loraserve.errors import InvalidRequest, LoraNotFound, ModelNotFound

logger = logging.getLogger(__name__)


@dataclass
class NamedAdapter:
    name: str
    lora_path: str  # as the caller wrote it
    entry: CacheEntry
    created: float = field(default_factory=time.time)


class NamedAdapters:
    def __init__(self, registry: AdapterRegistry, local: LocalSource, base_names: frozenset[str]) -> None:
        self._registry = registry
        self._local = local
        self._base_names = base_names
        self._named: dict[str, NamedAdapter] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._retiring: set[asyncio.Task[bool]] = set()  # held so they are not garbage-collected mid-way

    def get(self, name: str) -> NamedAdapter | None:
        return self._named.get(name)

    def all(self) -> list[NamedAdapter]:
        return list(self._named.values())

    async def lease(self, named: NamedAdapter, wait: bool = True) -> AdapterLease:
        return await self._registry.lease_entry(named.entry, wait)

    async def load(self, name: str, lora_path: str, inplace: bool = False) -> None:
        if not name or not lora_path:
            raise InvalidRequest(
                "Both 'lora_name' and 'lora_path' must be provided.", param="lora_path" if name else "lora_name"
            )
        if name in self._base_names:
            raise InvalidRequest(f"The lora adapter '{name}' conflicts with a served base model.", param="lora_name")
        async with self._locks[name]:
            previous = self._named.get(name)
            if previous is not None and not inplace:
                raise InvalidRequest(
                    f"The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, "
                    "set 'load_inplace' to True.",
                    param="lora_name",
                )
            model, source = self._reference(lora_path)
            try:
                lease = await self._registry.acquire(model, source, None)
            except ModelNotFound as exc:
                raise LoraNotFound(f"No adapter found at '{lora_path}' for '{name}'.", param="lora_path") from exc
            entry = lease.loaded.entry
            entry.pinned = True
            lease.release()
            self._named[name] = NamedAdapter(name, lora_path, entry)
            logger.info("loaded adapter %s as '%s' (pinned)", entry.root, name)
            if previous is not None and previous.entry is not entry:
                self._let_go(previous.entry)  # in place: new requests get the new weights from now on

    async def unload(self, name: str) -> None:
        if not name:
            raise InvalidRequest("'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
        async with self._locks[name]:
            named = self._named.pop(name, None)
            entries = [named.entry] if named is not None else self._registry.held_entries(name)
            if not entries:
                raise LoraNotFound(f"The lora adapter '{name}' cannot be found.", param="lora_name")
            for entry in entries:
                self._let_go(entry)
            logger.info("unloading adapter '%s': new requests no longer reach it", name)

    def _let_go(self, entry: CacheEntry) -> None:
        """Unpin ``entry`` and take it out of the engine once its requests finish (unless another name holds it)."""
        if any(other.entry is entry for other in self._named.values()):
            return
        entry.pinned = False
        task = asyncio.ensure_future(self._registry.retire(entry))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def settle(self) -> None:
        """Wait until every unload has reached the engine (tests, and a clean stop)."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    def _reference(self, lora_path: str) -> tuple[str, SourceKind]:
        """What ``lora_path`` names: ``s3://…``, ``local:NAME``, an absolute folder under --adapter-dir, or a Hub id."""
        if lora_path.startswith("s3://"):
            return lora_path, "s3"
        if lora_path.startswith("local:"):
            return lora_path.removeprefix("local:"), "local"
        if lora_path.startswith(("/", "~", ".")):
            path = Path(lora_path)  # never expanded: "~user" names another account's home
            local_name = self._local.name_of(path) if path.is_absolute() else None
            if local_name is None:
                raise InvalidRequest(
                    f"'{lora_path}' is not an absolute path inside an --adapter-dir folder: loraserve reads local "
                    "adapters only from those (start it with --adapter-dir <parent folder>).",
                    param="lora_path",
                )
            return local_name, "local"
        return lora_path, "hub"
