"""The bounded on-disk adapter cache.

Layout under the cache folder::

    entries/<key>/           one checked adapter snapshot (key = source, name and pinned version)
        .loraserve-entry.json   what it is; its mtime is the last use
    tmp/<key>.<pid>.<uuid>.incomplete/   downloads in progress; swept at start if <pid> is gone
    locks/<key>.lock          held while an entry is written, removed, or marked in use
    inuse/<key>.<pid>         process <pid> has the entry loaded in its engine; swept at start if <pid> is gone

A download is fetched into ``tmp/``, checked, then renamed into ``entries/``
in one ``os.replace``: a crash at any moment leaves no half entry. Several
servers may share the folder (the default is one per user): a file lock per
entry (filelock, as huggingface_hub does) makes one of them download while the
others wait and then adopt the entry from disk, and a server starting up
removes only the temporary folders of processes that are gone. The byte
budget holds before a download (sizes are known from the source) and after
it. Least recently used entries go first; an entry with leases (requests in
flight) or pinned is never evicted, and no process removes an entry that a
live process has marked in use (``loraserve adapters rm`` runs beside servers).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import anyio
from filelock import FileLock
from pydantic import ByteSize

from loraserve.adapters.events import NO_EVENTS, CacheEvents
from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.single_flight import SingleFlight
from loraserve.adapters.sources import Snapshot
from loraserve.errors import AdapterTooLarge, CacheFull

logger = logging.getLogger(__name__)

META = ".loraserve-entry.json"


class EntryInUse(Exception):
    """A live process has the entry loaded (its ``inuse/<key>.<pid>`` marker says so): it stays on disk."""

    def __init__(self, entry: CacheEntry, pids: list[int]) -> None:
        super().__init__(f"{entry.root} is loaded by loraserve process {', '.join(map(str, pids))}")
        self.entry = entry
        self.pids = pids


@dataclass
class CacheEntry:
    key: str
    path: Path
    size: int
    ref: AdapterRef
    version: str
    public: bool
    last_used: float
    leases: int = 0
    pinned: bool = False
    fetch_seconds: float | None = None  # download and checks, when this process fetched it

    @property
    def evictable(self) -> bool:
        return self.leases == 0 and not self.pinned

    @property
    def root(self) -> str:
        return f"{self.ref.name}@{self.version}"


def plan_eviction(entries: list[CacheEntry], need: int, budget: int) -> list[CacheEntry] | None:
    """Which entries to evict (least recently used first) so ``need`` more bytes fit; None if they can't."""
    used = sum(e.size for e in entries)
    victims: list[CacheEntry] = []
    for entry in sorted((e for e in entries if e.evictable), key=lambda e: e.last_used):
        if used + need <= budget:
            break
        victims.append(entry)
        used -= entry.size
    return victims if used + need <= budget else None


def _folder_size(folder: Path) -> int:
    """Bytes of the adapter's files (the small metadata file is not counted, as sources don't list it)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and p.name != META)


class AdapterStore:
    def __init__(
        self,
        root: Path,
        budget: int,
        on_evict: Callable[[CacheEntry], Awaitable[None]] | None = None,
        wait_timeout: float = 0.0,
    ) -> None:
        self.root = root
        self.budget = budget
        # How long a download waits for adapters in use to free room before a 507 (--adapter-wait-timeout).
        self.wait_timeout = wait_timeout
        self._room_freed = asyncio.Event()
        self._entries: dict[str, CacheEntry] = {}
        self._downloads: SingleFlight[CacheEntry] = SingleFlight()
        self._room = asyncio.Lock()
        self._reserved = 0
        self._on_evict = on_evict
        self._entries_dir = root / "entries"
        self._tmp_dir = root / "tmp"
        self._locks_dir = root / "locks"
        self.events: CacheEvents = NO_EVENTS  # metrics listen here
        self._inuse_dir = root / "inuse"

    def set_evict_hook(self, on_evict: Callable[[CacheEntry], Awaitable[None]]) -> None:
        """Called before an entry leaves the disk (the registry drops it from the engine)."""
        self._on_evict = on_evict

    # -- start-up ---------------------------------------------------------

    def open(self) -> None:
        """Sweep leftovers of interrupted downloads, then rebuild the index from disk."""
        self._make_dirs()
        for leftover in self.leftovers():  # another server's download in progress stays
            _remove(leftover)
        for folder in self.scan():
            logger.warning("removing unreadable adapter cache entry %s", folder.name)
            shutil.rmtree(folder, ignore_errors=True)
        logger.info(
            "Adapter cache: %s, %d adapters, %s of %s used",
            self.root,
            len(self._entries),
            ByteSize(self.used_bytes).human_readable(),
            ByteSize(self.budget).human_readable(),
        )

    def scan(self) -> list[Path]:
        """Build the index from disk, changing nothing there; return the entry folders that cannot be read."""
        unreadable = []
        for folder in _children(self._entries_dir):
            entry = self._read_entry(folder)
            if entry is None:
                unreadable.append(folder)
            else:
                self._entries[entry.key] = entry
        return unreadable

    def leftovers(self) -> list[Path]:
        """Temporary folders and in-use markers of processes that are gone (or, for markers, of this one:
        a process with our pid that left them has died, as this one has loaded nothing yet)."""
        tmp = [path for path in _children(self._tmp_dir) if not _owner_alive(path.name)]
        markers = [path for path in _children(self._inuse_dir) if not _marker_live(path.name)]
        return tmp + markers

    def downloads(self) -> list[Path]:
        """Temporary folders of live processes: downloads (or removals) in progress."""
        return [path for path in _children(self._tmp_dir) if _owner_alive(path.name)]

    def _read_entry(self, folder: Path) -> CacheEntry | None:
        try:
            meta = json.loads((folder / META).read_text())
            ref = AdapterRef(meta["source"], meta["name"], meta.get("revision"))
            return CacheEntry(
                key=folder.name,
                path=folder,
                size=_folder_size(folder),
                ref=ref,
                version=meta["version"],
                public=bool(meta["public"]),
                last_used=(folder / META).stat().st_mtime,
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # -- reading ----------------------------------------------------------

    @property
    def used_bytes(self) -> int:
        return sum(e.size for e in self._entries.values())

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    def get(self, key: str) -> CacheEntry | None:
        return self._entries.get(key)

    def cached_versions(self, ref: AdapterRef) -> list[CacheEntry]:
        """Entries of this reference, newest use first (for when the source is down)."""
        same = [
            e
            for e in self._entries.values()
            if e.ref.source == ref.source
            and e.ref.name == ref.name
            and (ref.revision is None or ref.revision in (e.ref.revision, e.version))
        ]
        return sorted(same, key=lambda e: e.last_used, reverse=True)

    @contextmanager
    def lease(self, entry: CacheEntry) -> Iterator[CacheEntry]:
        """Hold an entry for the length of a request: it cannot be evicted meanwhile."""
        entry.leases += 1
        self.touch(entry)
        try:
            yield entry
        finally:
            entry.leases -= 1
            if entry.leases == 0:
                self._signal_room()

    def _signal_room(self) -> None:
        """Wake downloads waiting for room (they check again, in the order they came: the lock is FIFO)."""
        self._room_freed.set()
        self._room_freed = asyncio.Event()

    def touch(self, entry: CacheEntry) -> None:
        entry.last_used = time.time()
        try:
            os.utime(entry.path / META)
        except OSError:
            pass

    # -- in use, on disk (leases live in one process's memory) ------------

    def mark_in_use(self, entry: CacheEntry) -> bool:
        """Record on disk that this process has the entry loaded; False (no marker) if its files are gone.

        Under the entry's lock, like a removal: either the removal came first and this sees no files, or
        the removal comes after and sees the marker. Blocks on the lock: call it from a worker thread.
        """
        self._make_dirs()
        with self._lock(entry.key):
            if not (entry.path / META).is_file():
                return False
            self._marker(entry.key).touch()
        return True

    def unmark_in_use(self, entry: CacheEntry) -> None:
        self._marker(entry.key).unlink(missing_ok=True)

    def in_use_by(self, key: str) -> list[int]:
        """Pids of live processes that have marked the entry in use."""
        pids = (_marker_pid(path.name) for path in _children(self._inuse_dir) if path.name.startswith(key + "."))
        return sorted(pid for pid in pids if pid is not None and _pid_alive(pid))

    def _marker(self, key: str) -> Path:
        return self._inuse_dir / f"{key}.{os.getpid()}"

    def discard(self, entry: CacheEntry) -> None:
        """Delete an entry now (for `loraserve adapters rm`); EntryInUse if a live process has it loaded."""
        try:
            doomed = self._move_aside(entry)
        except FileNotFoundError:  # deleted under us already
            doomed = None
        if self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
        if doomed is not None:
            shutil.rmtree(doomed, ignore_errors=True)

    # -- filling ----------------------------------------------------------

    async def ensure(
        self,
        snapshot: Snapshot,
        fetch: Callable[[Path], None],
        check: Callable[[Path], object],
    ) -> CacheEntry:
        """The entry for ``snapshot``, downloading it once however many callers ask."""
        entry = self._entries.get(snapshot.key)
        if entry is not None and not (entry.path / META).is_file():
            await self._forget_vanished(entry)
            entry = None
        if entry is not None:
            self.touch(entry)
            self.events.hit()
            return entry
        self.events.miss()
        return await self._downloads.run(snapshot.key, lambda: self._download(snapshot, fetch, check))

    async def _forget_vanished(self, entry: CacheEntry) -> None:
        """Someone deleted the entry's folder (an operator's rm -rf, a tmp cleaner): fetch it anew."""
        if self._entries.get(entry.key) is not entry:
            return
        logger.warning("adapter %s vanished from the cache folder; fetching it again", entry.root)
        del self._entries[entry.key]
        if entry.evictable and self._on_evict is not None:
            await self._on_evict(entry)  # requests still using it keep the engine's copy

    async def _download(
        self, snapshot: Snapshot, fetch: Callable[[Path], None], check: Callable[[Path], object]
    ) -> CacheEntry:
        need = snapshot.total_size
        if need > self.budget:
            raise AdapterTooLarge(
                f"{snapshot.ref.display()} needs {need} bytes, more than the whole adapter cache "
                f"(--adapter-cache-size {self.budget} bytes)",
                param="model",
            )
        await self._reserve(snapshot, need)
        work = self._tmp_dir / f"{snapshot.key}.{os.getpid()}.{uuid.uuid4().hex}.incomplete"
        lock = self._lock(snapshot.key)
        try:
            self._make_dirs()  # the cache folder may have been deleted under us
            # Another server sharing the folder may be writing this very entry: wait for it, then adopt it.
            await anyio.to_thread.run_sync(lock.acquire)
            adopted = self._read_entry(self._entries_dir / snapshot.key)
            if adopted is not None:
                # Written by another process (a server, `loraserve adapters pull`), checked against its base.
                await anyio.to_thread.run_sync(check, adopted.path)
                self._entries[adopted.key] = adopted
                logger.info("adapter %s was cached by another server sharing the folder", snapshot.root)
                return adopted
            work.mkdir()
            started = time.monotonic()
            await anyio.to_thread.run_sync(fetch, work)
            await anyio.to_thread.run_sync(check, work)
            meta = {
                "source": snapshot.ref.source,
                "name": snapshot.ref.name,
                "revision": snapshot.ref.revision,
                "version": snapshot.version,
                "public": snapshot.public,
                "fetched_at": time.time(),
            }
            (work / META).write_text(json.dumps(meta))
            target = self._entries_dir / snapshot.key
            self._make_dirs()
            os.replace(work, target)
            entry = CacheEntry(
                snapshot.key, target, _folder_size(target), snapshot.ref, snapshot.version, snapshot.public, time.time()
            )
            entry.fetch_seconds = time.monotonic() - started
            self._entries[entry.key] = entry
            self.events.downloaded(entry.size, entry.fetch_seconds)
            logger.info("cached adapter %s (%d bytes) in %.2f s", snapshot.root, entry.size, time.monotonic() - started)
        finally:
            if lock.is_locked:
                lock.release()
            self._reserved -= need
            self._signal_room()
            shutil.rmtree(work, ignore_errors=True)
        if entry.size > need:
            # The source understated the size: restore the budget now, sparing the new entry.
            async with self._room:
                with self.lease(entry):
                    await self._make_room(0)
        return entry

    async def _reserve(self, snapshot: Snapshot, need: int) -> None:
        """Make room for ``need`` bytes and hold it; wait (up to wait_timeout) while adapters in use fill it."""
        deadline = time.monotonic() + self.wait_timeout
        while True:
            freed = self._room_freed
            remaining = deadline - time.monotonic()
            async with self._room:
                if remaining <= 0 or plan_eviction(self.entries(), need + self._reserved, self.budget) is not None:
                    await self._make_room(need)  # CacheFull (with Retry-After) when there is still no room
                    self._reserved += need
                    return
            logger.info("adapter %s waits for room in the cache (adapters in use fill it)", snapshot.ref.display())
            self.events.waited_for_room()
            try:
                await asyncio.wait_for(freed.wait(), remaining)
            except TimeoutError:
                pass

    async def _make_room(self, need: int) -> None:
        victims = plan_eviction(self.entries(), need + self._reserved, self.budget)
        if victims is None:
            raise CacheFull(
                "The adapter cache is full of adapters that requests are using right now"
                + (f" (waited {self.wait_timeout:g} s for room)" if self.wait_timeout else "")
                + "; try again shortly."
            )
        for victim in victims:
            await self.evict(victim)

    async def evict(self, entry: CacheEntry) -> None:
        if not entry.evictable or self._entries.get(entry.key) is not entry:
            return
        del self._entries[entry.key]
        logger.info("evicting adapter %s (%d bytes) from the cache", entry.root, entry.size)
        self.events.evicted_from_disk()
        if self._on_evict is not None:
            await self._on_evict(entry)
        try:
            doomed = await anyio.to_thread.run_sync(self._move_aside, entry)  # in a thread: the lock may be held
        except FileNotFoundError:  # deleted under us already
            return
        except EntryInUse as exc:
            logger.warning("%s, so it stays on disk", exc)
            return
        await anyio.to_thread.run_sync(lambda: shutil.rmtree(doomed, ignore_errors=True))

    def _move_aside(self, entry: CacheEntry) -> Path:
        """Rename the entry out of entries/ so it vanishes at once; the slow delete happens after."""
        self._make_dirs()
        doomed = self._tmp_dir / f"{entry.key}.{os.getpid()}.{uuid.uuid4().hex}.evicted"
        with self._lock(entry.key):  # not while another process writes it or marks it in use
            users = self.in_use_by(entry.key)
            if users:
                raise EntryInUse(entry, users)
            os.replace(entry.path, doomed)
        return doomed

    def _make_dirs(self) -> None:
        for folder in (self._entries_dir, self._tmp_dir, self._locks_dir, self._inuse_dir):
            folder.mkdir(parents=True, exist_ok=True)

    def _lock(self, key: str) -> FileLock:
        # thread_local=False: acquired in a worker thread, released on the event loop's.
        return FileLock(str(self._locks_dir / f"{key}.lock"), thread_local=False)


def _owner_alive(name: str) -> bool:
    """Whether the process that named a temporary folder ``<key>.<pid>.<uuid>.<kind>`` still runs."""
    parts = name.split(".")
    if len(parts) != 4 or not parts[1].isdigit():
        return False  # an older layout or a stray: nobody owns it
    return _pid_alive(int(parts[1]))


def _marker_pid(name: str) -> int | None:
    key, _, pid = name.rpartition(".")
    return int(pid) if key and pid.isdigit() else None


def _marker_live(name: str) -> bool:
    """Whether an ``inuse/<key>.<pid>`` marker's process runs (this process marks nothing before open())."""
    pid = _marker_pid(name)
    return pid is not None and pid != os.getpid() and _pid_alive(pid)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False  # kill(0) would ask about our own process group
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except OverflowError:
        return False
    return True


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except FileNotFoundError:
        return []


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
