"""`loraserve adapters list | pull | rm | prune` on a cache folder, beside a store acting as a running server."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

from loraserve.adapters.cache_cli import main, parse_duration, parse_size
from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import LocalSource, RemoteFile, Snapshot
from loraserve.adapters.store import AdapterStore, CacheEntry
from tests.support.fake_hub import FakeHub, patch_default_endpoint
from tests.unit.adapters.helpers import write_adapter, write_base

DEAD_PID = 999_999_999  # above any pid_max: no process has it


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def loras(tmp_path: Path) -> Path:
    root = tmp_path / "loras"
    write_adapter(root / "team" / "a")
    write_adapter(root / "team" / "b", rank=8)
    return root


def run(cache: Path, *argv: str) -> int:
    return main([*argv, "--adapter-cache-dir", str(cache)])


def pull(cache: Path, loras: Path, name: str, *extra: str) -> int:
    return run(cache, "pull", f"local:{name}", "--adapter-dir", str(loras), *extra)


def listing(cache: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert run(cache, "list", "--json") == 0
    document: dict[str, object] = json.loads(capsys.readouterr().out)
    return document


def rows(cache: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    adapters = listing(cache, capsys)["adapters"]
    assert isinstance(adapters, list)
    return adapters


def mark(cache: Path, key: str, pid: int) -> Path:
    """An in-use marker as a server writes it when it loads the adapter into its engine."""
    marker = cache / "inuse" / f"{key}.{pid}"
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    return marker


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def age(cache: Path, key: str, seconds: float) -> None:
    """Make an entry's last use ``seconds`` ago (the metadata file's mtime, as the store keeps it)."""
    stamp = time.time() - seconds
    os.utime(cache / "entries" / key / ".loraserve-entry.json", (stamp, stamp))


def hub_entry(cache: Path, name: str, size: int, version: str = "v1") -> CacheEntry:
    """An entry written by a store (a server) from a Hub snapshot."""
    store = AdapterStore(cache, 10**9)
    store.open()
    snapshot = Snapshot(AdapterRef("hub", name), version, (RemoteFile("weights", size),), public=True)
    fetch = lambda dest: (dest / "weights").write_bytes(b"x" * size)  # noqa: E731
    return asyncio.run(store.ensure(snapshot, fetch, lambda _: None))


# -- list ---------------------------------------------------------------------


def test_list_on_an_empty_cache_says_so_and_creates_nothing(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cache, "list") == 0
    assert "0 adapters, 0 B" in capsys.readouterr().out
    document = listing(cache, capsys)
    assert document["adapters"] == [] and document["total_bytes"] == 0 and document["leftovers"] == 0
    assert not cache.exists()


def test_list_shows_each_entry_with_its_version_size_last_use_and_users(
    cache: Path, loras: Path, other_process: int, capsys: pytest.CaptureFixture[str]
) -> None:
    hub = hub_entry(cache, "acme/sql", 100, version="0123456789abcdef")
    assert pull(cache, loras, "team/a") == 0
    mark(cache, hub.key, other_process)
    mark(cache, hub.key, DEAD_PID)  # a server that died: not a user
    (cache / "tmp" / f"{hub.key}.{DEAD_PID}.0.incomplete").mkdir()
    capsys.readouterr()

    assert run(cache, "list") == 0
    table = capsys.readouterr().out
    assert "acme/sql" in table and "0123456789ab" in table and f"pid {other_process}" in table
    assert "local:team/a" in table and "2 adapters" in table and "prune" in table

    by_ref = {row["ref"]: row for row in rows(cache, capsys)}
    assert by_ref["acme/sql"]["in_use_by"] == [other_process]
    assert by_ref["acme/sql"]["size_bytes"] == 100 and by_ref["acme/sql"]["version"] == "0123456789abcdef"
    assert by_ref["local:team/a"]["in_use_by"] == [] and by_ref["local:team/a"]["source"] == "local"
    assert listing(cache, capsys)["leftovers"] == 2  # the dead download and the dead server's marker


def test_the_commands_import_neither_vllm_nor_torch(cache: Path) -> None:
    code = (
        "import sys\nfrom loraserve.cli import main\n"
        f"for argv in (['adapters', '--help'], ['adapters', 'list', '--adapter-cache-dir', {str(cache)!r}]):\n"
        "    try:\n        main(argv)\n    except SystemExit as exit:\n        assert not exit.code, exit.code\n"
        "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().endswith("[]")
    assert "pull" in result.stdout and "prune" in result.stdout


# -- pull ---------------------------------------------------------------------


async def test_a_pulled_local_adapter_is_adopted_by_a_running_server_without_fetching(
    cache: Path, loras: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = AdapterStore(cache, 10**9)
    server.open()  # running before the pull: its index does not have the adapter

    assert await asyncio.to_thread(pull, cache, loras, "team/a") == 0
    assert "cached team/a@" in capsys.readouterr().out

    source = LocalSource([loras])
    snapshot = source.resolve(AdapterRef("local", "team/a"), None)

    def no_fetch(dest: Path) -> None:
        raise AssertionError("the server downloaded an adapter the cache already holds")

    entry = await server.ensure(snapshot, no_fetch, lambda _: None)
    assert (entry.path / "adapter_model.safetensors").is_file()
    assert server.used_bytes == entry.size == snapshot.total_size
    assert await asyncio.to_thread(pull, cache, loras, "team/a") == 0  # a second pull finds it
    assert "is cached as" in capsys.readouterr().out


def test_pull_checks_the_adapter_and_leaves_nothing_when_it_fails(
    cache: Path, loras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = loras / "team" / "a" / "adapter_config.json"
    config.write_text(config.read_text().replace('"LORA"', '"IA3"'))
    assert pull(cache, loras, "team/a") == 1
    assert "only LoRA adapters" in capsys.readouterr().err
    assert pull(cache, loras, "team/b", "--max-lora-rank", "4") == 1
    assert "above" in capsys.readouterr().err
    assert rows(cache, capsys) == [] and list((cache / "tmp").iterdir()) == []

    base = write_base(tmp_path / "base")
    write_adapter(loras / "team" / "wide", in_features=16)  # LoRA-shaped, but for another base
    assert pull(cache, loras, "team/wide") == 0  # the structure alone is fine
    assert run(cache, "rm", "local:team/wide") == 0
    assert pull(cache, loras, "team/wide", "--model", str(base)) == 1
    assert "different base model" in capsys.readouterr().err
    assert pull(cache, loras, "team/b", "--model", str(base)) == 0


def test_pull_names_what_it_cannot_do(cache: Path, loras: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(cache, "pull", "local:team/a") == 1
    assert "--adapter-dir" in capsys.readouterr().err
    assert pull(cache, loras, "team/missing") == 1
    assert "does not exist" in capsys.readouterr().err
    assert run(cache, "pull", "not a ref") == 1
    assert "not an adapter reference" in capsys.readouterr().err


def test_pull_from_the_hub_pins_the_commit_and_shows_progress(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TQDM_POSITION", "-1")  # huggingface_hub's bars, as on a terminal
    with FakeHub() as hub:
        patch_default_endpoint(monkeypatch, hub.url)
        sha = hub.add_repo("acme/a", write_adapter(tmp_path / "published"))
        assert run(cache, "pull", "acme/a") == 0
    captured = capsys.readouterr()
    assert f"cached acme/a@{sha}" in captured.out
    assert "adapter_model.safetensors" in captured.err and "100%" in captured.err  # the download's bar
    (row,) = rows(cache, capsys)
    assert row["ref"] == "acme/a" and row["version"] == sha and row["source"] == "hub"


def test_pull_evicts_the_least_recently_used_but_never_what_a_server_uses(
    cache: Path, loras: Path, other_process: int, capsys: pytest.CaptureFixture[str]
) -> None:
    used = hub_entry(cache, "acme/used", 1000)
    idle = hub_entry(cache, "acme/idle", 1000)
    age(cache, used.key, 3600)  # least recently used, but a server has it loaded
    mark(cache, used.key, other_process)
    room = str(1000 + _folder_bytes(loras / "team" / "a") + 100)  # acme/idle must go for team/a
    assert pull(cache, loras, "team/a", "--adapter-cache-size", room) == 0
    assert "evicting acme/idle" in capsys.readouterr().out
    assert {row["ref"] for row in rows(cache, capsys)} == {"acme/used", "local:team/a"}
    assert not idle.path.exists()

    tight = str(1000 + _folder_bytes(loras / "team" / "b") - 1)  # evicting team/a is not enough
    assert pull(cache, loras, "team/b", "--adapter-cache-size", tight) == 1
    assert "loaded by running servers" in capsys.readouterr().err
    assert used.path.is_dir()


def test_a_pull_waits_for_a_server_writing_the_same_adapter_then_adopts_its_copy(
    cache: Path, loras: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    elsewhere = tmp_path / "elsewhere"
    assert pull(elsewhere, loras, "team/a") == 0  # the copy the "server" is about to rename into place
    (written,) = (elsewhere / "entries").iterdir()
    lock = FileLock(str(cache / "locks" / f"{written.name}.lock"))
    (cache / "locks").mkdir(parents=True)
    (cache / "entries").mkdir()
    capsys.readouterr()
    with lock:  # the server's download holds the entry's lock
        pulling = threading.Thread(target=pull, args=(cache, loras, "team/a"))
        pulling.start()
        time.sleep(0.5)
        assert pulling.is_alive()  # waiting for the lock
        os.replace(written, cache / "entries" / written.name)
    pulling.join(30)
    assert not pulling.is_alive()
    assert "is cached as team/a@" in capsys.readouterr().out  # adopted, not fetched again


# -- rm -----------------------------------------------------------------------


def test_rm_refuses_an_adapter_a_live_server_has_loaded_until_that_server_is_gone(
    cache: Path, loras: Path, other_process: int, capsys: pytest.CaptureFixture[str]
) -> None:
    entry = hub_entry(cache, "acme/a", 10)
    marker = mark(cache, entry.key, other_process)
    assert run(cache, "rm", "acme/a") == 1
    err = capsys.readouterr().err
    assert f"pid {other_process}" in err and "not removed" in err
    assert entry.path.is_dir()

    marker.unlink()
    mark(cache, entry.key, DEAD_PID)  # the server died without unmarking
    assert run(cache, "rm", "acme/a") == 0
    assert "removed acme/a@v1" in capsys.readouterr().out
    assert not entry.path.exists() and rows(cache, capsys) == []


def test_rm_takes_every_version_of_a_ref_or_just_the_one_named(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for version in ("aaaaaaaaaa11", "bbbbbbbbbb22", "cccccccccc33"):
        hub_entry(cache, "acme/a", 10, version=version)
    hub_entry(cache, "acme/other", 10)
    assert run(cache, "rm", "acme/a@aaaaaaaaaa11", "acme/a@bbbbbbb") == 0  # full version, then a prefix
    assert sorted(row["version"] for row in rows(cache, capsys)) == ["cccccccccc33", "v1"]
    assert run(cache, "rm", "acme/a") == 0
    assert [row["ref"] for row in rows(cache, capsys)] == ["acme/other"]
    assert run(cache, "rm", "acme/a") == 1
    assert "no cached adapter matches" in capsys.readouterr().err


async def test_a_server_that_had_the_entry_in_its_index_fetches_it_again_after_rm(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = AdapterStore(cache, 10**9)
    server.open()
    snapshot = Snapshot(AdapterRef("hub", "acme/a"), "v1", (RemoteFile("weights", 10),), public=True)
    fetches: list[Path] = []

    def fetch(dest: Path) -> None:
        fetches.append(dest)
        (dest / "weights").write_bytes(b"x" * 10)

    await server.ensure(snapshot, fetch, lambda _: None)
    assert await asyncio.to_thread(run, cache, "rm", "acme/a") == 0  # on disk, indexed by the server, not loaded
    again = await server.ensure(snapshot, fetch, lambda _: None)
    assert len(fetches) == 2 and (again.path / "weights").read_bytes() == b"x" * 10
    assert server.used_bytes == 10


# -- prune --------------------------------------------------------------------


def test_prune_removes_leftovers_and_what_no_server_uses(
    cache: Path, other_process: int, capsys: pytest.CaptureFixture[str]
) -> None:
    used = hub_entry(cache, "acme/used", 10)
    hub_entry(cache, "acme/idle", 10)
    mark(cache, used.key, other_process)
    stale = mark(cache, used.key, DEAD_PID)
    dead_download = cache / "tmp" / f"{used.key}.{DEAD_PID}.0.incomplete"
    live_download = cache / "tmp" / f"{used.key}.{other_process}.0.incomplete"
    unreadable = cache / "entries" / "garbage"
    for folder in (dead_download, live_download, unreadable):
        folder.mkdir()

    assert run(cache, "prune", "--dry-run") == 0
    assert "would remove acme/idle@v1" in capsys.readouterr().out
    assert stale.exists() and dead_download.exists() and unreadable.exists() and len(rows(cache, capsys)) == 2

    assert run(cache, "prune") == 0
    assert not stale.exists() and not dead_download.exists() and not unreadable.exists()
    assert live_download.exists()  # a download in progress stays
    assert [row["ref"] for row in rows(cache, capsys)] == ["acme/used"]


def test_prune_keeps_the_most_recent_up_to_keep_and_only_removes_older_than(
    cache: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, hours in (("new", 1), ("mid", 30), ("old", 24 * 10), ("oldest", 24 * 20)):
        entry = hub_entry(cache, f"acme/{name}", 100)
        age(cache, entry.key, hours * 3600)

    assert run(cache, "prune", "--older-than", "7d", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "acme/old@" in out and "acme/oldest@" in out and "acme/mid@" not in out
    assert len(rows(cache, capsys)) == 4

    assert run(cache, "prune", "--keep", "250B") == 0  # the two most recent fit in 250 bytes
    assert {row["ref"] for row in rows(cache, capsys)} == {"acme/new", "acme/mid"}
    assert run(cache, "prune", "--older-than", "2d") == 0  # mid is only 30 h old
    assert {row["ref"] for row in rows(cache, capsys)} == {"acme/new", "acme/mid"}
    assert run(cache, "prune", "--older-than", "1d", "--keep", "0") == 0
    assert {row["ref"] for row in rows(cache, capsys)} == {"acme/new"}


def test_durations_and_sizes_read_as_people_write_them() -> None:
    assert parse_duration("7d") == 7 * 86400 and parse_duration("12h") == 12 * 3600 and parse_duration("1.5m") == 90
    assert parse_size("500MB") == 500 * 10**6 and parse_size("1GiB") == 1024**3
    with pytest.raises(SystemExit):
        main(["prune", "--older-than", "soon"])


def test_rm_with_one_unknown_ref_removes_nothing(cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hub_entry(cache, "acme/a", 10)
    assert run(cache, "rm", "acme/a", "acme/typo") == 1
    assert "acme/typo" in capsys.readouterr().err
    assert [row["ref"] for row in rows(cache, capsys)] == ["acme/a"]
