from __future__ import annotations

import asyncio
import os
import shutil
import threading
from pathlib import Path

import pytest

from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import RemoteFile, Snapshot
from loraserve.adapters.store import AdapterStore, CacheEntry, EntryInUse, plan_eviction
from loraserve.errors import AdapterTooLarge, CacheFull, InvalidAdapter


def _snapshot(name: str, size: int, version: str = "v1") -> Snapshot:
    return Snapshot(AdapterRef("hub", f"org/{name}"), version, (RemoteFile("weights", size),), public=True)


def _writer(size: int, calls: list[str] | None = None):  # type: ignore[no-untyped-def]
    def fetch(dest: Path) -> None:
        if calls is not None:
            calls.append(threading.current_thread().name)
        (dest / "weights").write_bytes(b"x" * size)

    return fetch


def _entry(key: str, size: int, used: float, leases: int = 0) -> CacheEntry:
    return CacheEntry(key, Path(key), size, AdapterRef("hub", "o/" + key), "v", True, used, leases)


def test_plan_eviction_takes_least_recently_used_first_and_skips_leased() -> None:
    entries = [_entry("old", 40, 1.0), _entry("busy", 40, 0.5, leases=1), _entry("new", 40, 3.0)]
    assert [e.key for e in plan_eviction(entries, 40, 120) or []] == ["old"]
    assert [e.key for e in plan_eviction(entries, 40, 100) or []] == ["old", "new"]
    assert plan_eviction(entries, 100, 100) is None  # "busy" can never go


async def test_concurrent_first_requests_download_once(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 10_000)
    store.open()
    calls: list[str] = []
    snapshot = _snapshot("a", 100)
    entries = await asyncio.gather(*(store.ensure(snapshot, _writer(100, calls), lambda _: None) for _ in range(16)))
    assert len(calls) == 1
    assert all(e is entries[0] for e in entries)
    assert (entries[0].path / "weights").read_bytes() == b"x" * 100


async def test_a_failed_check_leaves_no_entry_and_every_waiter_gets_the_error(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 10_000)
    store.open()

    def refuse(_: Path) -> None:
        raise InvalidAdapter("bad")

    results = await asyncio.gather(
        *(store.ensure(_snapshot("a", 10), _writer(10), refuse) for _ in range(4)), return_exceptions=True
    )
    assert all(isinstance(r, InvalidAdapter) for r in results)
    assert store.entries() == []
    assert list((tmp_path / "entries").iterdir()) == []
    assert list((tmp_path / "tmp").iterdir()) == []


async def test_budget_evicts_lru_but_never_a_leased_entry(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 1000)
    store.open()
    evicted: list[str] = []

    async def on_evict(entry: CacheEntry) -> None:
        evicted.append(entry.ref.name)

    store.set_evict_hook(on_evict)
    first = await store.ensure(_snapshot("a", 400), _writer(400), lambda _: None)
    await store.ensure(_snapshot("b", 400), _writer(400), lambda _: None)
    with store.lease(first):
        await store.ensure(_snapshot("c", 400), _writer(400), lambda _: None)
    assert evicted == ["org/b"]
    assert store.used_bytes <= 1000
    assert not any(p.name.endswith(".evicted") for p in (tmp_path / "tmp").iterdir())
    with store.lease(store.entries()[0]), store.lease(store.entries()[1]):
        with pytest.raises(CacheFull):
            await store.ensure(_snapshot("d", 400), _writer(400), lambda _: None)


async def test_an_adapter_larger_than_the_budget_is_refused_before_download(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 100)
    store.open()
    calls: list[str] = []
    with pytest.raises(AdapterTooLarge):
        await store.ensure(_snapshot("huge", 101), _writer(101, calls), lambda _: None)
    assert calls == []


async def test_index_is_rebuilt_and_leftovers_swept_at_start(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 10_000)
    store.open()
    entry = await store.ensure(_snapshot("a", 10), _writer(10), lambda _: None)
    half = tmp_path / "tmp" / "deadbeef.123.incomplete"
    half.mkdir()
    (half / "weights").write_bytes(b"partial")
    (tmp_path / "entries" / "garbage").mkdir()
    reopened = AdapterStore(tmp_path, 10_000)
    reopened.open()
    assert [e.key for e in reopened.entries()] == [entry.key]
    assert reopened.entries()[0].ref == AdapterRef("hub", "org/a")
    assert not half.exists()
    assert not (tmp_path / "entries" / "garbage").exists()


async def test_a_cancelled_waiter_does_not_cancel_the_shared_download(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 10_000)
    store.open()
    gate = threading.Event()

    def slow(dest: Path) -> None:
        gate.wait(5)
        (dest / "weights").write_bytes(b"x")

    snapshot = _snapshot("a", 1)
    leaving = asyncio.ensure_future(store.ensure(snapshot, slow, lambda _: None))
    staying = asyncio.ensure_future(store.ensure(snapshot, slow, lambda _: None))
    await asyncio.sleep(0.05)
    leaving.cancel()
    gate.set()
    entry = await staying
    assert store.get(entry.key) is entry


async def test_a_pinned_entry_is_never_evicted(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 1000)
    store.open()
    pinned = await store.ensure(_snapshot("a", 600), _writer(600), lambda _: None)
    pinned.pinned = True
    with pytest.raises(CacheFull):
        await store.ensure(_snapshot("b", 600), _writer(600), lambda _: None)
    assert store.get(pinned.key) is pinned and pinned.path.exists()


async def test_a_download_waits_for_room_until_an_adapter_in_use_is_released(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 1000, wait_timeout=30)
    store.open()
    busy = await store.ensure(_snapshot("a", 600), _writer(600), lambda _: None)
    with store.lease(busy):
        waiting = asyncio.create_task(store.ensure(_snapshot("b", 600), _writer(600), lambda _: None))
        await asyncio.sleep(0.2)
        assert not waiting.done()  # no 507 at once: it waits for room
    entry = await asyncio.wait_for(waiting, 10)  # the lease ended: "a" is evicted, "b" fits
    assert entry.ref.name == "org/b" and store.get(busy.key) is None


async def test_waiters_get_room_in_arrival_order(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 1000, wait_timeout=30)
    store.open()
    busy = await store.ensure(_snapshot("a", 900), _writer(900), lambda _: None)
    done: list[str] = []

    async def fetch(name: str) -> None:
        entry = await store.ensure(_snapshot(name, 900), _writer(900), lambda _: None)
        done.append(name)
        with store.lease(entry):
            await asyncio.sleep(0.05)

    with store.lease(busy):
        tasks = []
        for name in ("first", "second", "third"):
            tasks.append(asyncio.create_task(fetch(name)))
            await asyncio.sleep(0.05)
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert done == ["first", "second", "third"]


async def test_after_the_wait_timeout_a_full_cache_is_507_with_retry_after(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 1000, wait_timeout=0.3)
    store.open()
    busy = await store.ensure(_snapshot("a", 600), _writer(600), lambda _: None)
    with store.lease(busy), pytest.raises(CacheFull) as raised:
        await asyncio.wait_for(store.ensure(_snapshot("b", 600), _writer(600), lambda _: None), 10)
    assert raised.value.retry_after is not None and "waited" in raised.value.message
    assert store.used_bytes <= 1000


async def test_two_servers_on_one_cache_folder_share_a_download_without_errors(tmp_path: Path) -> None:
    first, second = AdapterStore(tmp_path, 10_000), AdapterStore(tmp_path, 10_000)
    first.open()
    second.open()
    snapshot = _snapshot("a", 100)
    entries = await asyncio.gather(
        first.ensure(snapshot, _writer(100), lambda _: None), second.ensure(snapshot, _writer(100), lambda _: None)
    )
    assert entries[0].path == entries[1].path and (entries[0].path / "weights").read_bytes() == b"x" * 100
    assert [p.name for p in (tmp_path / "entries").iterdir()] == [snapshot.key]


async def test_opening_the_cache_keeps_downloads_of_live_owners_and_sweeps_dead_ones(tmp_path: Path) -> None:
    first = AdapterStore(tmp_path, 10_000)
    first.open()
    gate = threading.Event()

    def slow_fetch(dest: Path) -> None:
        gate.wait(10)
        (dest / "weights").write_bytes(b"x" * 10)

    downloading = asyncio.create_task(first.ensure(_snapshot("a", 10), slow_fetch, lambda _: None))
    while not list((tmp_path / "tmp").iterdir()):
        await asyncio.sleep(0.01)
    dead = tmp_path / "tmp" / "deadbeef.999999999.0123.incomplete"  # a pid no process has
    dead.mkdir()
    AdapterStore(tmp_path, 10_000).open()  # a second server starts on the same folder
    assert not dead.exists()
    gate.set()
    entry = await asyncio.wait_for(downloading, 10)  # the first server's download was left alone
    assert (entry.path / "weights").exists()


async def test_mark_in_use_leaves_a_marker_until_unmarked_and_refuses_a_vanished_entry(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path, 10_000)
    store.open()
    entry = await store.ensure(_snapshot("a", 10), _writer(10), lambda _: None)
    assert store.mark_in_use(entry)
    assert (tmp_path / "inuse" / f"{entry.key}.{os.getpid()}").is_file()
    assert store.in_use_by(entry.key) == [os.getpid()]
    store.unmark_in_use(entry)
    assert store.in_use_by(entry.key) == []
    shutil.rmtree(entry.path)  # removed by `loraserve adapters rm` before the engine read it
    assert not store.mark_in_use(entry)
    assert store.in_use_by(entry.key) == []


async def test_an_entry_another_live_process_has_loaded_is_never_removed(tmp_path: Path, other_process: int) -> None:
    store = AdapterStore(tmp_path, 1000)
    store.open()
    entry = await store.ensure(_snapshot("a", 600), _writer(600), lambda _: None)
    (tmp_path / "inuse" / f"{entry.key}.{other_process}").touch()
    with pytest.raises(EntryInUse) as raised:
        store.discard(entry)
    assert raised.value.pids == [other_process]
    await store.ensure(_snapshot("b", 600), _writer(600), lambda _: None)  # evicts "a" from this index only
    assert store.get(entry.key) is None and (entry.path / "weights").is_file()


async def test_opening_the_cache_sweeps_in_use_markers_of_processes_that_are_gone(
    tmp_path: Path, other_process: int
) -> None:
    inuse = tmp_path / "inuse"
    inuse.mkdir(parents=True)
    live, dead, ours = (inuse / f"k.{pid}" for pid in (other_process, 999_999_999, os.getpid()))
    for marker in (live, dead, ours):
        marker.touch()
    AdapterStore(tmp_path, 10_000).open()  # "ours": left by a dead process that had our pid; we loaded nothing
    assert [p.name for p in inuse.iterdir()] == [live.name]


async def test_an_entry_another_process_wrote_is_checked_before_it_is_adopted(tmp_path: Path) -> None:
    server = AdapterStore(tmp_path, 10_000)
    server.open()
    snapshot = _snapshot("a", 10)
    await AdapterStore(tmp_path, 10_000).ensure(snapshot, _writer(10), lambda _: None)  # `adapters pull`

    def refuse(_: Path) -> None:
        raise InvalidAdapter("not for this base")

    with pytest.raises(InvalidAdapter):
        await server.ensure(snapshot, _writer(10), refuse)
    assert server.get(snapshot.key) is None and (tmp_path / "entries" / snapshot.key).is_dir()
