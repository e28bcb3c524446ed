"""From a request's `model` to an adapter the engine can run, for one requester.

Per request: parse the name (no I/O for bad names), resolve it at its source
with the requester's token (cached briefly per token, so access is checked
for every requester and one caller's token never opens a private adapter to
another), make sure the pinned snapshot is in the disk cache, load it into the
engine once (its errors become a 400 here, not an engine crash), and hand out
a lease that keeps it from eviction until the request ends.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Coroutine
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
from cachetools import TTLCache
from transformers import PreTrainedTokenizerBase

from loraserve.adapters.merge import MergeSpec, merge_adapters, merge_key, planned_size
from loraserve.adapters.ref import AdapterRef, SourceKind, parse_ref, split_spec
from loraserve.adapters.single_flight import SingleFlight
from loraserve.adapters.sources import RemoteFile, Snapshot, Source
from loraserve.adapters.store import AdapterStore, CacheEntry
from loraserve.adapters.validate import WEIGHTS, BaseShapes, check_adapter
from loraserve.engine import Engine, EngineDead, EngineRejected, LoraTarget
from loraserve.errors import EngineUnavailable, InvalidAdapter, ModelNotFound, SourceUnavailable
from loraserve.templates import ChatFormat, load_tokenizer

logger = logging.getLogger(__name__)

_RESOLVE_CACHE_SIZE = 4096


@dataclass
class LoadedAdapter:
    entry: CacheEntry
    target: LoraTarget
    chat: ChatFormat | None  # None: the adapter ships no template, use the base's
    load_seconds: float = 0.0  # the engine's add_lora, on first use
    in_flight: int = 0  # requests running with this LoRA id
    retired: bool = False  # being removed from the engine: new requests load a fresh id
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set whenever in_flight is 0

    def __post_init__(self) -> None:
        self.idle.set()


def _engine_error(entry: CacheEntry, exc: BaseException) -> Exception | None:
    """What a client is told when the engine refused ``entry`` or is gone (None: ``exc`` as it is)."""
    if isinstance(exc, EngineRejected):
        reason = str(exc).replace(str(entry.path), entry.ref.display())  # no server paths to clients
        return _EngineRefused(f"the engine could not load {entry.ref.display()}: {reason}")
    if isinstance(exc, EngineDead):
        return EngineUnavailable.engine_down()
    return None


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark the answer's error as seen: requests that raise it may all have gone already."""
    if not task.cancelled():
        task.exception()


class _EngineRefused(InvalidAdapter):
    """The engine refused the snapshot (a 400 to the client); the caller drops it from the cache."""


class _EntryVanished(Exception):
    """The entry's files were removed before it could be marked in use (`loraserve adapters rm`)."""


class _InputsNeeded(Exception):
    """A merge thought cached has to be made after all (its files vanished): fetch its inputs and merge."""


def _inputs_needed(dest: Path) -> None:
    raise _InputsNeeded


class AdapterLease:
    """An adapter held for one request; ``release()`` exactly once when the request ends."""

    def __init__(self, store: AdapterStore, loaded: LoadedAdapter) -> None:
        self.loaded = loaded
        self._hold = store.lease(loaded.entry)
        self._hold.__enter__()
        loaded.in_flight += 1
        loaded.idle.clear()
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._hold.__exit__(None, None, None)
            self.loaded.in_flight -= 1
            if self.loaded.in_flight == 0:
                self.loaded.idle.set()


def token_fingerprint(token: str | None) -> str:
    return hashlib.sha256((token or "").encode()).hexdigest()


class AdapterRegistry:
    def __init__(
        self,
        engine: Engine,
        store: AdapterStore,
        sources: dict[SourceKind, Source],
        base_shapes: BaseShapes,
        base_names: frozenset[str],
        base_tokenizer: PreTrainedTokenizerBase,
        max_lora_rank: int,
        resolve_ttl: float,
        server_token: str | None,
        source_timeout: float = 20.0,
        allowed: list[str] | None = None,
    ) -> None:
        self._engine = engine
        self._store = store
        self._allowed = allowed or []
        self._source_timeout = source_timeout
        self._sources = sources
        self._base_shapes = base_shapes
        self._base_names = base_names
        self._base_tokenizer = base_tokenizer
        self._max_rank = max_lora_rank
        self._server_token = server_token
        self._snapshots: TTLCache[tuple[str, str, str | None, str], Snapshot] = TTLCache(
            _RESOLVE_CACHE_SIZE, resolve_ttl
        )
        self._verified: dict[str, set[str]] = {}  # entry key -> token fingerprints that resolved it
        self._loaded: dict[str, LoadedAdapter] = {}
        self._resolves: SingleFlight[Snapshot] = SingleFlight()
        self._loads: SingleFlight[LoadedAdapter] = SingleFlight()
        self._ids = itertools.count(1)  # never reused, so an id always means the same weights
        # Not awaited by their callers: engine removals of evicted adapters, evictions of refused ones.
        self._background: set[asyncio.Task[None]] = set()
        self.last_resolve_seconds: dict[str, float] = {}  # entry key -> the last round trip to its source

    async def acquire(
        self, model: str, source: SourceKind, request_token: str | None, wait: bool = True
    ) -> AdapterLease:
        """The adapter ``model`` names, downloaded and loaded; ``wait=False``: see ``_lease``."""
        ref = parse_ref(model, source)
        if not self.allows(ref):
            raise ModelNotFound(model)  # as if it did not exist: no I/O, and nothing said about the list
        token = request_token or self._server_token if source == "hub" else None
        fingerprint = token_fingerprint(token)
        try:
            snapshot = await self._resolve(ref, token, fingerprint)
        except SourceUnavailable:
            fallback = self._cached_fallback(ref, fingerprint)
            if fallback is None:
                raise
            logger.warning("source down: serving %s from the cache", fallback.root)
            lease = await self._lease(fallback, wait)
            if lease is None:
                raise
            return lease
        source_impl = self._sources[ref.source]
        for _ in range(3):
            entry = await self._store.ensure(
                snapshot,
                fetch=lambda dest: source_impl.fetch(snapshot, dest, token),
                check=lambda folder: self._check(folder, snapshot.ref.display()),
            )
            self._verified.setdefault(entry.key, set()).add(fingerprint)
            lease = await self._lease(entry, wait)
            if lease is not None:
                return lease
        raise SourceUnavailable(f"{ref.display()} was evicted while loading; try again.")

    async def acquire_merged(
        self, spec: MergeSpec, source: SourceKind, request_token: str | None, wait: bool = True
    ) -> AdapterLease:
        """One LoRA merged from ``spec.ids`` (each from ``source``), cached under a key of the spec and of its
        inputs' pinned versions, and served like any adapter (its name is ``merged:<16 hex digits of the key>``).

        Each input is resolved with the requester's token, as ``acquire`` resolves one adapter, so only a
        requester who may read every input gets the merge; it is public only if they all are. A cached merge
        needs none of its inputs on disk; a new one fetches them into the cache, leases them while
        ``merge_adapters`` runs in a worker thread, and reserves the merge's size in the budget first.
        """
        refs = [parse_ref(model, source) for model in spec.ids]
        for model, ref in zip(spec.ids, refs, strict=True):
            if not self.allows(ref):
                raise ModelNotFound(model)
        token = request_token or self._server_token if source == "hub" else None
        fingerprint = token_fingerprint(token)
        snapshots = await asyncio.gather(*(self._resolve(ref, token, fingerprint) for ref in refs))
        key = merge_key(spec, [f"{s.ref.source}:{s.ref.name}@{s.version}" for s in snapshots])
        merged = AdapterRef("merged", f"merged:{key[:16]}")
        public = all(s.public for s in snapshots)
        for attempt in range(3):
            # Size unknown yet: enough to find the entry, which is all a cache hit needs.
            probe = Snapshot(merged, key, (), public)
            try:
                if attempt == 0 and self._store.get(probe.key) is not None:
                    entry = await self._store.ensure(probe, _inputs_needed, self._checker(merged))
                else:
                    entry = await self._merge_into_cache(spec, probe, snapshots, token, fingerprint)
            except _InputsNeeded:
                continue
            lease = await self._lease(entry, wait)
            if lease is not None:
                return lease
        raise SourceUnavailable(f"{merged.display()} was evicted while loading; try again.")

    async def _merge_into_cache(
        self, spec: MergeSpec, probe: Snapshot, inputs: list[Snapshot], token: str | None, fingerprint: str
    ) -> CacheEntry:
        with ExitStack() as held:  # the inputs stay on disk until the merge is written
            folders = [(await self._hold_input(snapshot, token, fingerprint, held)).path for snapshot in inputs]
            size = await anyio.to_thread.run_sync(planned_size, folders, spec)
            snapshot = Snapshot(probe.ref, probe.version, (RemoteFile(WEIGHTS, size),), probe.public)
            return await self._store.ensure(
                snapshot, lambda dest: merge_adapters(folders, spec, dest), self._checker(probe.ref)
            )

    async def _hold_input(self, snapshot: Snapshot, token: str | None, fingerprint: str, held: ExitStack) -> CacheEntry:
        source_impl = self._sources[snapshot.ref.source]
        for _ in range(3):
            entry = await self._store.ensure(
                snapshot,
                fetch=lambda dest: source_impl.fetch(snapshot, dest, token),
                check=self._checker(snapshot.ref),
            )
            if self._store.get(entry.key) is entry:  # not evicted while others ran
                self._verified.setdefault(entry.key, set()).add(fingerprint)
                held.enter_context(self._store.lease(entry))
                return entry
        raise SourceUnavailable(f"{snapshot.ref.display()} was evicted while loading; try again.")

    def _checker(self, ref: AdapterRef) -> Callable[[Path], None]:
        return lambda folder: self._check(folder, ref.display())

    def allows(self, ref: AdapterRef) -> bool:
        """--allow-adapter: globs on the reference as --preload-adapter writes it (org/name, local:NAME, s3://…)."""
        if not self._allowed:
            return True
        spelled = f"local:{ref.name}" if ref.source == "local" else ref.name
        return any(fnmatch.fnmatchcase(spelled, pattern) for pattern in self._allowed)

    async def preload(self, spec: str) -> CacheEntry:
        """Fetch, load and pin one adapter named as on the command line (see --preload-adapter)."""
        source, name = split_spec(spec)
        lease = await self.acquire(name, source, None)
        entry = lease.loaded.entry
        entry.pinned = True
        lease.release()
        logger.info("preloaded and pinned adapter %s", entry.root)
        return entry

    async def _lease(self, entry: CacheEntry, wait: bool = True) -> AdapterLease | None:
        """Load ``entry`` and lease it, unless it was evicted meanwhile (the caller then retries).

        ``wait=False`` (a request about to generate): return once add_lora is on its way to the engine; the
        request follows it and ``generate`` raises the refusal, if any (``LoraTarget.loaded``).
        """
        # Other requests ran while this one waited for the download: the entry may be gone already.
        if self._store.get(entry.key) is not entry:
            return None
        # Held across the load: between download and add_lora the entry is in use, so making room
        # for another adapter cannot delete the files the engine is about to read.
        try:
            with self._store.lease(entry):
                try:
                    loaded = await self._load(entry)
                    answer = loaded.target.loaded
                    if wait and answer is not None:
                        await asyncio.shield(answer)
                except _EntryVanished:
                    return None
                if self._store.get(entry.key) is entry and loaded.entry is entry and not loaded.retired:
                    return AdapterLease(self._store, loaded)
        except _EngineRefused:
            # A snapshot the engine refuses would fail every time: drop it from the cache, now that this
            # request's lease is off it (evict leaves entries in use alone).
            await self._store.evict(entry)
            raise
        return None

    async def lease_entry(self, entry: CacheEntry, wait: bool = True) -> AdapterLease:
        """A lease on this very entry (an adapter loaded by name through the admin API)."""
        for _ in range(3):
            lease = await self._lease(entry, wait)
            if lease is not None:
                return lease
        raise SourceUnavailable(f"{entry.ref.display()} left the cache; load it again.")

    async def retire(self, entry: CacheEntry) -> bool:
        """Take ``entry``'s LoRA out of the engine once the requests using it have finished.

        New requests load it afresh under a new id meanwhile, so nothing waits for the old one.
        Returns whether it was loaded.
        """
        loaded = self._loaded.get(entry.key)
        if loaded is None or loaded.entry is not entry:
            return False
        del self._loaded[entry.key]
        loaded.retired = True
        await loaded.idle.wait()
        await self._remove_from_engine(loaded)
        if entry.key not in self._loaded:  # not loaded again meanwhile: `loraserve adapters rm` may take it
            self._store.unmark_in_use(entry)
        return True

    async def _resolve(self, ref: AdapterRef, token: str | None, fingerprint: str) -> Snapshot:
        key = (ref.source, ref.name, ref.revision, fingerprint)
        cached = self._snapshots.get(key)
        if cached is not None:
            return cached

        async def work() -> Snapshot:
            started = time.monotonic()
            # The sources carry socket timeouts too; this bounds the whole answer, retries included.
            try:
                with anyio.fail_after(self._source_timeout):
                    snapshot = await anyio.to_thread.run_sync(
                        self._sources[ref.source].resolve, ref, token, abandon_on_cancel=True
                    )
            except TimeoutError as exc:
                raise SourceUnavailable(
                    f"The {ref.source} source did not answer for {ref.display()} within "
                    f"{self._source_timeout:g} s; try again later."
                ) from exc
            self._snapshots[key] = snapshot
            self.last_resolve_seconds[snapshot.key] = time.monotonic() - started
            return snapshot

        return await self._resolves.run(key, work)

    def _cached_fallback(self, ref: AdapterRef, fingerprint: str) -> CacheEntry | None:
        for entry in self._store.cached_versions(ref):
            if entry.public or fingerprint in self._verified.get(entry.key, set()):
                return entry
        return None

    def _check(self, folder: Path, name: str) -> None:
        check_adapter(folder, self._base_shapes, self._base_names, self._max_rank, name=name)

    async def _load(self, entry: CacheEntry) -> LoadedAdapter:
        loaded = self._loaded.get(entry.key)
        if loaded is not None and loaded.entry is entry:
            return loaded
        # Keyed by the entry object too: a load of an evicted copy must not be joined by its successor.
        return await self._loads.run((entry.key, id(entry)), lambda: self._load_once(entry))

    async def _load_once(self, entry: CacheEntry) -> LoadedAdapter:
        int_id = next(self._ids)
        # vLLM compares LoRARequests by name: a re-downloaded snapshot gets a name of its own.
        target = LoraTarget(name=f"{entry.ref.name}@{entry.version}#{int_id}", int_id=int_id, path=str(entry.path))
        # Marked on disk before anything reads the files, so `loraserve adapters rm` and other servers leave them.
        if not await anyio.to_thread.run_sync(self._store.mark_in_use, entry):
            raise _EntryVanished  # removed meanwhile: the caller fetches it anew
        try:
            chat = await anyio.to_thread.run_sync(self._chat_format, entry.path)
            started = time.monotonic()
            answer = await self._engine.send_lora(target)
            if answer.done():  # the engine answered already (it takes no request before it has)
                answer.result()
        except BaseException as exc:
            self._store.unmark_in_use(entry)  # not loaded after all
            error = _engine_error(entry, exc)
            if error is None:
                raise
            raise error from exc
        loaded = LoadedAdapter(entry, target, chat)
        if answer.done():
            self._loaded_into_engine(loaded, started)
        else:
            # Requests may follow add_lora before its answer: they carry it, and generate waits for it.
            confirmed = asyncio.ensure_future(self._answered(loaded, answer, started))
            confirmed.add_done_callback(_retrieve)
            loaded.target = replace(target, loaded=confirmed)
        if self._store.get(entry.key) is entry:
            self._loaded[entry.key] = loaded
        return loaded

    async def _answered(self, loaded: LoadedAdapter, answer: asyncio.Future[None], started: float) -> None:
        """The engine's answer to add_lora for ``loaded``, which requests may already follow."""
        entry = loaded.entry
        try:
            await answer
        except BaseException as exc:
            if self._loaded.get(entry.key) is loaded:
                del self._loaded[entry.key]  # the next request loads it afresh, under a new id
            self._store.unmark_in_use(entry)
            if isinstance(exc, EngineRejected):
                # A snapshot the engine refuses would fail every time: drop it once its requests have ended.
                self._in_background(self._evict_when_idle(loaded))
            error = _engine_error(entry, exc)
            if error is None:
                raise
            raise error from exc
        loaded.target = replace(loaded.target, loaded=None)
        self._loaded_into_engine(loaded, started)

    def _loaded_into_engine(self, loaded: LoadedAdapter, started: float) -> None:
        loaded.load_seconds = time.monotonic() - started
        self._store.events.loaded_into_engine()
        logger.info("loaded adapter %s as LoRA id %d", loaded.target.name, loaded.target.int_id)

    async def _evict_when_idle(self, loaded: LoadedAdapter) -> None:
        await loaded.idle.wait()
        await self._store.evict(loaded.entry)

    def _in_background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _chat_format(self, folder: Path) -> ChatFormat | None:
        """The adapter's own template if it ships one; None means "use the base's"."""
        template_file = folder / "chat_template.jinja"
        config_file = folder / "tokenizer_config.json"
        config: dict[str, Any] = {}
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text())
            except (UnicodeDecodeError, OSError, json.JSONDecodeError) as exc:
                raise InvalidAdapter("the adapter's tokenizer_config.json is not valid JSON") from exc
        has_template = template_file.is_file() or bool(config.get("chat_template"))
        if not has_template:
            return None
        if (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file():
            try:
                return ChatFormat(load_tokenizer(folder))
            except Exception as exc:  # tokenizer loading raises many types
                raise InvalidAdapter("the adapter's tokenizer files cannot be loaded") from exc
        # A template without tokenizer files: the base tokenizer with the adapter's template.
        try:
            template = template_file.read_text() if template_file.is_file() else str(config["chat_template"])
        except (UnicodeDecodeError, OSError) as exc:
            raise InvalidAdapter("the adapter's chat_template.jinja is not readable UTF-8 text") from exc
        return ChatFormat(self._base_tokenizer, template)

    async def forget(self, entry: CacheEntry) -> None:
        """Called by the store before it deletes an entry: drop it from the engine too."""
        loaded = self._loaded.pop(entry.key, None)
        self._store.unmark_in_use(entry)
        self._verified.pop(entry.key, None)
        self.last_resolve_seconds.pop(entry.key, None)
        if loaded is not None:
            # Not awaited: the engine answers between two steps, so waiting held the cache (and the download
            # that needed the room) for a step or more. Nothing needs it done first: the entry is in no request
            # (only unused entries are evicted), gone from _loaded so no new request gets its id, and the
            # engine keeps the weights in memory, so the files can go at once.
            self._in_background(self._remove_from_engine(loaded))

    async def _remove_from_engine(self, loaded: LoadedAdapter) -> None:
        self._store.events.removed_from_engine()
        try:
            await self._engine.remove_lora(loaded.target.int_id)
        except Exception:  # the engine may already have dropped it from its own LRU
            logger.debug("engine did not remove LoRA %d", loaded.target.int_id, exc_info=True)

    def entries(self) -> list[CacheEntry]:
        return self._store.entries()

    def held_entries(self, name: str) -> list[CacheEntry]:
        """Entries of the adapter a request would name ``name`` that are loaded in the engine or pinned."""
        return [
            entry
            for entry in self._store.entries()
            if name in (entry.ref.display(), entry.ref.name) and (entry.key in self._loaded or entry.pinned)
        ]

    def status(self) -> list[dict[str, Any]]:
        """What is cached and loaded, for /v1/adapters (public adapters only: private ones stay unlisted)."""
        rows = []
        for entry in sorted(self._store.entries(), key=lambda e: e.last_used, reverse=True):
            if not entry.public:
                continue
            loaded = self._loaded.get(entry.key)
            rows.append(
                {
                    "id": entry.ref.display(),
                    "source": entry.ref.source,
                    "root": entry.root,
                    "size_bytes": entry.size,
                    "in_flight": entry.leases,
                    "pinned": entry.pinned,
                    "last_used": int(entry.last_used),
                    "lora_id": loaded.target.int_id if loaded else None,
                    "own_chat_template": bool(loaded and loaded.chat),
                    "resolve_seconds": self.last_resolve_seconds.get(entry.key),
                    "download_seconds": entry.fetch_seconds,
                    "load_seconds": loaded.load_seconds if loaded else None,
                }
            )
        return rows

    def cache_summary(self) -> dict[str, int]:
        entries = self._store.entries()
        return {
            "entries": len(entries),
            "used_bytes": self._store.used_bytes,
            "budget": self._store.budget,
            "in_engine": len(self._loaded),
            "pinned": sum(entry.pinned for entry in entries),
        }
