"""The registry with the real huggingface_hub client against a Hub-protocol server, and a fake engine."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraserve.adapters import registry as registry_module
from loraserve.adapters.merge import MergeSpec, merge_key
from loraserve.adapters.registry import AdapterRegistry
from loraserve.adapters.sources import HubSource, LocalSource, S3Source
from loraserve.adapters.store import AdapterStore, CacheEntry, EntryInUse
from loraserve.adapters.validate import BaseShapes
from loraserve.engine import EngineRejected, LoraTarget
from loraserve.errors import CacheFull, InvalidAdapter, ModelNotFound, SourceUnavailable
from loraserve.templates import ChatFormat, load_tokenizer
from tests.support.fake_hub import FakeHub, patch_default_endpoint
from tests.unit.adapters.helpers import write_adapter, write_base
from tests.unit.conftest import FakeEngine

TOKEN = "hf_team_token"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as running:
        patch_default_endpoint(monkeypatch, running.url)
        yield running


def _registry(
    tmp_path: Path,
    model_dir: Path,
    engine: FakeEngine,
    budget: int = 10**9,
    ttl: float = 60,
    source_timeout: float = 20.0,
    allowed: list[str] | None = None,
    local_roots: list[Path] | None = None,
) -> AdapterRegistry:
    write_base(model_dir)
    store = AdapterStore(tmp_path / "cache", budget)
    store.open()
    registry = AdapterRegistry(
        engine=engine,
        store=store,
        sources={
            "hub": HubSource(source_timeout),
            "local": LocalSource(local_roots or []),
            "s3": S3Source(source_timeout),
        },
        base_shapes=BaseShapes.from_folder(model_dir),
        base_names=frozenset({"base"}),
        base_tokenizer=ChatFormat(load_tokenizer(model_dir)).tokenizer,
        max_lora_rank=16,
        resolve_ttl=ttl,
        server_token=None,
        source_timeout=source_timeout,
        allowed=allowed,
    )
    store.set_evict_hook(registry.forget)
    return registry


def _publish(hub: FakeHub, tmp_path: Path, repo: str, **kwargs: object) -> str:
    folder = write_adapter(tmp_path / "src" / repo.replace("/", "__"), **kwargs)  # type: ignore[arg-type]
    private = kwargs.pop("private", False) if "private" in kwargs else False
    return hub.add_repo(repo, folder, private=bool(private), token=TOKEN if private else None)


async def test_a_hub_adapter_is_pinned_to_its_commit_and_loaded_once(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    engine = FakeEngine()
    registry = _registry(tmp_path, model_dir, engine)
    sha = _publish(hub, tmp_path, "acme/a")
    leases = await asyncio.gather(*(registry.acquire("acme/a", "hub", None) for _ in range(8)))
    assert {lease.loaded.target.int_id for lease in leases} == {leases[0].loaded.target.int_id}
    assert leases[0].loaded.entry.version == sha
    assert len(engine.loras) == 1
    assert hub.hits[("acme/a", "adapter_model.safetensors")] == 1
    for lease in leases:
        lease.release()
    assert leases[0].loaded.entry.leases == 0


async def test_a_moved_branch_is_a_new_entry_never_new_weights_under_an_old_id(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    engine = FakeEngine()
    registry = _registry(tmp_path, model_dir, engine, ttl=0)
    first_sha = _publish(hub, tmp_path, "acme/a")
    first = await registry.acquire("acme/a", "hub", None)
    second_sha = hub.add_repo("acme/a", write_adapter(tmp_path / "v2", rank=8))
    second = await registry.acquire("acme/a", "hub", None)
    assert (first.loaded.entry.version, second.loaded.entry.version) == (first_sha, second_sha)
    assert first.loaded.target.int_id != second.loaded.target.int_id
    assert first.loaded.target.path != second.loaded.target.path
    pinned = await registry.acquire(f"acme/a@{first_sha}", "hub", None)
    assert pinned.loaded.entry is first.loaded.entry


async def test_private_adapters_check_every_requester(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine())
    folder = write_adapter(tmp_path / "private")
    hub.add_repo("acme/private", folder, private=True, token=TOKEN)
    with pytest.raises(ModelNotFound):
        await registry.acquire("acme/private", "hub", None)
    opened = await registry.acquire("acme/private", "hub", TOKEN)
    opened.release()
    for token in (None, "hf_other"):
        with pytest.raises(ModelNotFound):
            await registry.acquire("acme/private", "hub", token)


async def test_small_budget_evicts_from_disk_and_engine_and_refetches(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    engine = FakeEngine()
    one_adapter = write_adapter(tmp_path / "probe")
    size = sum(p.stat().st_size for p in one_adapter.iterdir())
    registry = _registry(tmp_path, model_dir, engine, budget=int(size * 1.5))
    _publish(hub, tmp_path, "acme/a")
    _publish(hub, tmp_path, "acme/b")
    a = await registry.acquire("acme/a", "hub", None)
    a.release()
    b = await registry.acquire("acme/b", "hub", None)
    assert not a.loaded.entry.path.exists()
    assert a.loaded.target.int_id not in engine.loras
    assert list(engine.loras) == [b.loaded.target.int_id]
    with pytest.raises(CacheFull):  # b is in use: it must not be evicted for a
        await registry.acquire("acme/a", "hub", None)
    b.release()
    again = await registry.acquire("acme/a", "hub", None)
    assert again.loaded.entry.path.exists()
    assert hub.hits[("acme/a", "adapter_model.safetensors")] == 2
    assert again.loaded.target.int_id not in (a.loaded.target.int_id, b.loaded.target.int_id)


async def test_hub_down_serves_a_cached_public_adapter_and_503_otherwise(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine(), ttl=0)
    _publish(hub, tmp_path, "acme/a")
    (await registry.acquire("acme/a", "hub", None)).release()
    hub.add_repo("acme/private", write_adapter(tmp_path / "p"), private=True, token=TOKEN)
    (await registry.acquire("acme/private", "hub", TOKEN)).release()
    hub.down = True
    served = await registry.acquire("acme/a", "hub", None)
    assert served.loaded.entry.ref.name == "acme/a"
    with pytest.raises(SourceUnavailable):
        await registry.acquire("acme/never-seen", "hub", None)
    with pytest.raises(SourceUnavailable):  # private and never opened without a token: no fallback
        await registry.acquire("acme/private", "hub", None)
    (await registry.acquire("acme/private", "hub", TOKEN)).release()


async def test_pickled_adapters_are_refused_before_download(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine())
    hub.add_repo("acme/pickled", write_adapter(tmp_path / "pk", pickle_only=True))
    with pytest.raises(InvalidAdapter, match="pickled"):
        await registry.acquire("acme/pickled", "hub", None)
    assert not any(repo == "acme/pickled" for repo, _ in hub.hits)


async def test_gated_adapters_check_every_requesters_access(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine())
    hub.add_repo("acme/gated", write_adapter(tmp_path / "gated"), gated=True, token=TOKEN)
    with pytest.raises(ModelNotFound):  # its metadata is readable, its files are not
        await registry.acquire("acme/gated", "hub", None)
    granted = await registry.acquire("acme/gated", "hub", TOKEN)
    assert not granted.loaded.entry.public
    granted.release()
    for token in (None, "hf_other"):  # cached now, and still closed to requesters without access
        with pytest.raises(ModelNotFound):
            await registry.acquire("acme/gated", "hub", token)


@pytest.fixture
def silent_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A Hub address that accepts connections and never answers a byte."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    patch_default_endpoint(monkeypatch, url)
    try:
        yield url
    finally:
        listener.close()


async def test_a_hub_that_never_answers_is_a_503_within_the_source_timeout(
    silent_hub: str, tmp_path: Path, model_dir: Path
) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine(), source_timeout=1.0)
    # Guarded, so a regression fails instead of hanging the suite (it hung for good before the timeout).
    with pytest.raises(SourceUnavailable) as raised:
        await asyncio.wait_for(registry.acquire("acme/a", "hub", None), 60)
    assert raised.value.retry_after is not None
    assert "did not answer" in raised.value.message or "unreachable" in raised.value.message


def test_sources_carry_the_timeout_into_their_clients() -> None:
    s3 = S3Source(timeout_s=3.0)
    config = s3._s3().meta.config
    assert (config.connect_timeout, config.read_timeout) == (3.0, 3.0)
    assert HubSource(timeout_s=3.0).timeout_s == 3.0


class _SlowRemoveEngine(FakeEngine):
    """remove_lora answers only when the test lets it: vLLM's engine answers between two steps."""

    def __init__(self) -> None:
        super().__init__()
        self.finish = asyncio.Event()

    async def remove_lora(self, int_id: int) -> None:
        await self.finish.wait()
        await super().remove_lora(int_id)


async def test_an_eviction_does_not_wait_for_the_engine_to_drop_the_adapter(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    engine = _SlowRemoveEngine()
    size = sum(p.stat().st_size for p in write_adapter(tmp_path / "probe").iterdir())
    registry = _registry(tmp_path, model_dir, engine, budget=int(size * 1.5))
    _publish(hub, tmp_path, "acme/a")
    _publish(hub, tmp_path, "acme/b")
    a = await registry.acquire("acme/a", "hub", None)
    a.release()
    # b evicts a: b is served while the engine still holds a's LoRA, and a's files are gone already.
    b = await asyncio.wait_for(registry.acquire("acme/b", "hub", None), 30)
    assert not a.loaded.entry.path.exists()
    assert sorted(engine.loras) == sorted([a.loaded.target.int_id, b.loaded.target.int_id])
    assert [e.ref.name for e in registry.entries()] == ["acme/b"]
    engine.finish.set()
    for _ in range(100):  # the removal runs in the background
        if list(engine.loras) == [b.loaded.target.int_id]:
            break
        await asyncio.sleep(0.01)
    assert list(engine.loras) == [b.loaded.target.int_id]
    b.release()


class _SlowLoadEngine(FakeEngine):
    """add_lora waits until the test lets it finish, and checks the files are still there (as vLLM reads them)."""

    def __init__(self) -> None:
        super().__init__()
        self.loading = asyncio.Event()
        self.finish = asyncio.Event()

    async def add_lora(self, lora: LoraTarget) -> None:
        self.loading.set()
        await self.finish.wait()
        if not Path(lora.path).is_dir():
            raise EngineRejected(f"No adapter found for {lora.path}")
        await super().add_lora(lora)


async def test_an_adapter_being_loaded_is_never_evicted(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    engine = _SlowLoadEngine()
    _publish(hub, tmp_path, "acme/a")
    _publish(hub, tmp_path, "acme/b")
    one_adapter = sum(f.stat().st_size for f in (tmp_path / "src" / "acme__a").iterdir())
    registry = _registry(tmp_path, model_dir, engine, budget=one_adapter + 100)
    loading_a = asyncio.create_task(registry.acquire("acme/a", "hub", None))
    await asyncio.wait_for(engine.loading.wait(), 30)
    # b needs a's room while a is between its download and the engine: a must not go.
    with pytest.raises(CacheFull):
        await asyncio.wait_for(registry.acquire("acme/b", "hub", None), 10)
    engine.finish.set()
    lease = await asyncio.wait_for(loading_a, 30)
    assert lease.loaded.entry.path.is_dir()
    assert hub.hits[("acme/a", "adapter_model.safetensors")] == 1
    lease.release()


async def test_only_allowed_adapters_are_fetched_and_others_are_404_without_io(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine(), allowed=["acme/*", "local:team/*"])
    _publish(hub, tmp_path, "acme/a")
    _publish(hub, tmp_path, "evil/a")
    (await registry.acquire("acme/a@main", "hub", None)).release()  # a revision does not change the repo
    for model, source in (("evil/a", "hub"), ("acmex/a", "hub"), ("other/x", "local"), ("s3://b/acme/a", "s3")):
        with pytest.raises(ModelNotFound):
            await registry.acquire(model, source, None)  # type: ignore[arg-type]
    assert not any("evil" in path for _, path in hub.request_log)


def _markers(tmp_path: Path) -> list[str]:
    folder = tmp_path / "cache" / "inuse"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


async def test_a_loaded_adapter_is_marked_in_use_on_disk_until_it_leaves_the_engine(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    one_adapter = sum(p.stat().st_size for p in write_adapter(tmp_path / "probe").iterdir())
    registry = _registry(tmp_path, model_dir, FakeEngine(), budget=int(one_adapter * 1.5))
    _publish(hub, tmp_path, "acme/a")
    _publish(hub, tmp_path, "acme/b")
    a = await registry.acquire("acme/a", "hub", None)
    a.release()  # no request holds it, but the engine has it: `loraserve adapters rm` must not take it
    assert _markers(tmp_path) == [f"{a.loaded.entry.key}.{os.getpid()}"]
    beside = AdapterStore(tmp_path / "cache", 10**9)  # the cache commands' view
    beside.scan()
    with pytest.raises(EntryInUse):
        beside.discard(beside.entries()[0])
    b = await registry.acquire("acme/b", "hub", None)  # evicts a: unloaded, unmarked, deleted
    assert _markers(tmp_path) == [f"{b.loaded.entry.key}.{os.getpid()}"]
    assert not a.loaded.entry.path.exists()


async def test_an_adapter_the_engine_refuses_is_not_left_marked(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine(reject_loras=True))
    _publish(hub, tmp_path, "acme/a")
    with pytest.raises(InvalidAdapter):
        await registry.acquire("acme/a", "hub", None)
    assert _markers(tmp_path) == []
    assert registry.entries() == []  # it would fail every time: dropped from the cache too


async def test_a_request_may_follow_add_lora_before_its_answer(hub: FakeHub, tmp_path: Path, model_dir: Path) -> None:
    engine = FakeEngine(pipeline_loras=True, lora_answer_delay=0.2)
    registry = _registry(tmp_path, model_dir, engine)
    _publish(hub, tmp_path, "acme/a")
    lease = await registry.acquire("acme/a", "hub", None, wait=False)
    answer = lease.loaded.target.loaded
    assert answer is not None and not answer.done()  # add_lora is on its way, not answered
    joined = await registry.acquire("acme/a", "hub", None, wait=False)
    assert joined.loaded is lease.loaded  # a second request follows the same load
    await answer
    assert lease.loaded.target.loaded is None and lease.loaded.load_seconds >= 0.2
    waited = await registry.acquire("acme/a", "hub", None)  # the default waits, and it is loaded now
    assert waited.loaded is lease.loaded and lease.loaded.target.int_id in engine.loras
    for held in (lease, joined, waited):
        held.release()


async def test_a_refusal_that_comes_after_the_request_drops_the_adapter(
    hub: FakeHub, tmp_path: Path, model_dir: Path
) -> None:
    engine = FakeEngine(pipeline_loras=True, lora_answer_delay=0.1, reject_loras=True)
    registry = _registry(tmp_path, model_dir, engine)
    _publish(hub, tmp_path, "acme/a")
    lease = await registry.acquire("acme/a", "hub", None, wait=False)
    answer = lease.loaded.target.loaded
    assert answer is not None
    with pytest.raises(InvalidAdapter, match="could not load acme/a: unsupported adapter"):
        await answer
    assert _markers(tmp_path) == []
    assert registry.entries() != []  # still leased by the request: it stays until the request ends
    lease.release()
    for _ in range(100):
        if not registry.entries():
            break
        await asyncio.sleep(0.01)
    assert registry.entries() == []  # it would fail every time: dropped from the cache once unused
    # A caller that waits gets the refusal itself, as before.
    with pytest.raises(InvalidAdapter, match="unsupported adapter"):
        await registry.acquire("acme/a", "hub", None)
    assert registry.entries() == []


async def test_an_adapter_removed_between_download_and_load_is_fetched_again(
    hub: FakeHub, tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = _registry(tmp_path, model_dir, FakeEngine())
    store = registry._store
    _publish(hub, tmp_path, "acme/a")
    real_mark = store.mark_in_use
    removed: list[str] = []

    def rm_first(entry: CacheEntry) -> bool:
        if not removed:  # `loraserve adapters rm` gets the lock just before the server does
            beside = AdapterStore(tmp_path / "cache", 10**9)
            beside.scan()
            beside.discard(beside.get(entry.key))  # type: ignore[arg-type]
            removed.append(entry.key)
        return real_mark(entry)

    monkeypatch.setattr(store, "mark_in_use", rm_first)
    lease = await registry.acquire("acme/a", "hub", None)
    assert removed and (lease.loaded.entry.path / "adapter_model.safetensors").is_file()
    assert hub.hits[("acme/a", "adapter_model.safetensors")] == 2
    assert _markers(tmp_path) == [f"{lease.loaded.entry.key}.{os.getpid()}"]
    lease.release()


async def test_a_merge_is_cached_once_under_its_inputs_and_a_second_request_hits_it(
    tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = FakeEngine()
    root = tmp_path / "adapters"
    write_adapter(root / "a")
    write_adapter(root / "b", rank=8)
    registry = _registry(tmp_path, model_dir, engine, local_roots=[root])
    merges: list[list[Path]] = []
    real_merge = registry_module.merge_adapters

    def counted(folders: list[Path], spec: MergeSpec, dest: Path, seed: int | None = None) -> None:
        merges.append(list(folders))
        real_merge(folders, spec, dest, seed)

    monkeypatch.setattr(registry_module, "merge_adapters", counted)
    spec = MergeSpec(("a", "b"), (0.5, 0.5))
    leases = await asyncio.gather(*(registry.acquire_merged(spec, "local", None) for _ in range(3)))
    entry = leases[0].loaded.entry
    assert {lease.loaded.entry.key for lease in leases} == {entry.key} and len(merges) == 1
    inputs = {e.ref.name: e for e in registry.entries() if e.ref.source == "local"}
    assert entry.version == merge_key(spec, [f"local:{n}@{inputs[n].version}" for n in ("a", "b")])
    assert (entry.ref.source, entry.ref.name, entry.public) == ("merged", f"merged:{entry.version[:16]}", True)
    assert (entry.path / "adapter_model.safetensors").is_file() and len(engine.loras) == 1
    assert all(e.leases == 0 for e in inputs.values())  # held only while merging
    for lease in leases:
        lease.release()
    for source_entry in inputs.values():  # a cached merge needs none of its inputs
        await registry._store.evict(source_entry)
    again = await registry.acquire_merged(MergeSpec(("a", "b"), (0.5, 0.5), "linear", 0.3), "local", None)
    assert again.loaded.entry is entry and again.loaded.target == leases[0].loaded.target
    assert len(merges) == 1 and [e.ref.source for e in registry.entries()] == ["merged"]
    other = await registry.acquire_merged(MergeSpec(("a", "b"), (0.7, 0.3)), "local", None)
    assert other.loaded.entry.key != entry.key and len(merges) == 2


async def test_a_new_version_of_an_input_is_a_new_merge(tmp_path: Path, model_dir: Path) -> None:
    root = tmp_path / "adapters"
    write_adapter(root / "a")
    write_adapter(root / "b")
    registry = _registry(tmp_path, model_dir, FakeEngine(), ttl=0, local_roots=[root])
    spec = MergeSpec(("a", "b"), (1.0, 1.0))
    first = await registry.acquire_merged(spec, "local", None)
    write_adapter(root / "b", rank=8)
    second = await registry.acquire_merged(spec, "local", None)
    assert first.loaded.entry.key != second.loaded.entry.key
    assert first.loaded.target.int_id != second.loaded.target.int_id


async def test_every_input_of_a_merge_must_be_allowed_and_merged_names_are_never_requested(
    tmp_path: Path, model_dir: Path
) -> None:
    root = tmp_path / "adapters"
    write_adapter(root / "team" / "a")
    write_adapter(root / "other")
    registry = _registry(tmp_path, model_dir, FakeEngine(), allowed=["local:team/*"], local_roots=[root])
    with pytest.raises(ModelNotFound, match="`other`"):
        await registry.acquire_merged(MergeSpec(("team/a", "other"), (0.5, 0.5)), "local", None)
    assert registry.entries() == []
    with pytest.raises(ModelNotFound):
        await registry.acquire("merged:0123456789abcdef", "merged", None)
