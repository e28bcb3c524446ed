"""A process killed in the middle of a download leaves no cache entry; the next start sweeps the rest."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import HubSource
from loraserve.adapters.store import AdapterStore
from tests.support.fake_hub import FakeHub, patch_default_endpoint
from tests.unit.adapters.helpers import write_adapter

_DOWNLOADER = """
import asyncio, sys
from pathlib import Path
from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import HubSource
from loraserve.adapters.store import AdapterStore

async def main() -> None:
    store = AdapterStore(Path(sys.argv[1]), 10**9)
    store.open()
    source = HubSource()
    snapshot = source.resolve(AdapterRef("hub", "acme/slow"), None)
    await store.ensure(snapshot, lambda dest: source.fetch(snapshot, dest, None), lambda _: None)

asyncio.run(main())
"""


def test_kill_during_download_leaves_no_entry(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    cache = tmp_path / "cache"
    with FakeHub() as hub:
        patch_default_endpoint(monkeypatch, hub.url)
        hub.add_repo("acme/slow", write_adapter(tmp_path / "slow"))
        hub.file_delay = 3.0
        child = subprocess.Popen(
            [sys.executable, "-c", _DOWNLOADER, str(cache)], env={**os.environ, "HF_ENDPOINT": hub.url}
        )
        deadline = time.monotonic() + 30
        while not any(path.startswith("/acme/slow/resolve") and method == "GET" for method, path in hub.request_log):
            assert time.monotonic() < deadline and child.poll() is None, "the download never started"
            time.sleep(0.05)
        time.sleep(0.5)  # well inside the first file's body
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert list((cache / "entries").iterdir()) == []
        assert list((cache / "tmp").iterdir()), "expected the half download to be left in tmp/"

        store = AdapterStore(cache, 10**9)
        store.open()
        assert store.entries() == []
        assert list((cache / "tmp").iterdir()) == []

        hub.file_delay = 0
        source = HubSource()
        snapshot = source.resolve(AdapterRef("hub", "acme/slow"), None)
        entry = asyncio.run(store.ensure(snapshot, lambda dest: source.fetch(snapshot, dest, None), lambda _: None))
        assert (entry.path / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "slow" / "adapter_model.safetensors"
        ).read_bytes()
