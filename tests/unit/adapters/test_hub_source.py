"""HubSource with the real huggingface_hub client against the Hub-protocol test server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from loraserve.adapters import sources
from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.sources import HubSource, RemoteFile
from loraserve.errors import ModelNotFound, SourceUnavailable
from tests.support.fake_hub import FakeHub, patch_default_endpoint
from tests.unit.adapters.helpers import write_adapter


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    with FakeHub() as running:
        patch_default_endpoint(monkeypatch, running.url)
        yield running


def _publish(hub: FakeHub, tmp_path: Path) -> Path:
    folder = write_adapter(tmp_path / "src", chat_template="{{ messages }}")
    hub.add_repo("org/adapter", folder)
    return folder


def test_fetch_downloads_every_file_at_once(hub: FakeHub, tmp_path: Path) -> None:
    source = _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    assert len(snapshot.files) >= 3  # config, weights, the chat template
    hub.file_delay = 0.5  # each body takes half a second: one after the other would never overlap
    dest = tmp_path / "dest"
    dest.mkdir()
    HubSource().fetch(snapshot, dest, None)
    assert hub.most_bodies_in_flight == len(snapshot.files)
    for file in snapshot.files:
        assert (dest / file.name).read_bytes() == (source / file.name).read_bytes()
    assert not (dest / ".cache").exists()  # huggingface_hub's bookkeeping is not part of the entry


def test_a_missing_file_fails_the_fetch_after_the_others_end(hub: FakeHub, tmp_path: Path) -> None:
    _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    gone = replace(snapshot, files=(RemoteFile("aaa_not_there.json", 10), *snapshot.files))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ModelNotFound):
        HubSource().fetch(gone, dest, None)
    # The error came from the first file, yet every other download ran to its end before fetch returned. The test
    # Hub counts a body as complete only after the client has its last byte: wait for its books, not the client.
    deadline = time.monotonic() + 5
    while hub.bodies_in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert all(hub.completed[("org/adapter", file.name)] == 1 for file in snapshot.files)


def _resolve_requests(hub: FakeHub) -> list[str]:
    return [method for method, path in hub.request_log if "/resolve/" in path]


def test_small_files_take_one_get_each_and_no_metadata_request(hub: FakeHub, tmp_path: Path) -> None:
    source = _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    HubSource().fetch(snapshot, dest, None)
    # resolve listed the files and sizes at the pinned commit: a HEAD per file would only add a round trip.
    assert _resolve_requests(hub) == ["GET"] * len(snapshot.files)
    assert all(f"/resolve/{snapshot.version}/" in path for method, path in hub.request_log if "/resolve/" in path)
    assert sorted(p.name for p in dest.iterdir()) == sorted(file.name for file in snapshot.files)
    for file in snapshot.files:
        assert (dest / file.name).read_bytes() == (source / file.name).read_bytes()


def test_files_over_the_direct_limit_go_through_hf_hub_download(hub: FakeHub, tmp_path: Path) -> None:
    source = _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    HubSource(direct_limit=0).fetch(snapshot, dest, None)
    assert "HEAD" in _resolve_requests(hub)  # hf_hub_download asks for the file's metadata first
    assert sorted(p.name for p in dest.iterdir()) == sorted(file.name for file in snapshot.files)
    for file in snapshot.files:
        assert (dest / file.name).read_bytes() == (source / file.name).read_bytes()


def test_a_file_of_another_size_than_listed_fails_the_fetch(hub: FakeHub, tmp_path: Path) -> None:
    _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    # The listing said one size, the body has another (a repo rewritten under a commit, a proxy cutting the body).
    wrong = replace(snapshot, files=tuple(replace(file, size=file.size + 1) for file in snapshot.files))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(SourceUnavailable) as raised:
        HubSource().fetch(wrong, dest, None)
    assert isinstance(raised.value.__cause__, OSError) and "Consistency check" in str(raised.value.__cause__)


def test_a_5xx_on_a_file_is_tried_again(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _publish(hub, tmp_path)
    monkeypatch.setattr(sources, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    hub.failing_file_gets = 2
    HubSource().fetch(snapshot, dest, None)
    assert _resolve_requests(hub) == ["GET"] * (len(snapshot.files) + 2)
    for file in snapshot.files:
        assert (dest / file.name).read_bytes() == (source / file.name).read_bytes()


def test_a_hub_that_keeps_failing_a_file_fails_the_fetch(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _publish(hub, tmp_path)
    monkeypatch.setattr(sources, "RETRY_WAITS_S", (0.0, 0.0, 0.0))
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    hub.failing_file_gets = 100
    with pytest.raises(SourceUnavailable):
        HubSource().fetch(snapshot, dest, None)
    assert len(_resolve_requests(hub)) == len(snapshot.files) * (len(sources.RETRY_WAITS_S) + 1)


def test_downloads_are_flagged_as_huggingface_hubs_own_are(hub: FakeHub, tmp_path: Path) -> None:
    from huggingface_hub import constants

    counter = getattr(constants, "X_HF_DOWNLOAD_COUNTER", None)
    if counter is None:
        pytest.skip("this huggingface_hub does not flag downloads")
    _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    dest = tmp_path / "dest"
    dest.mkdir()
    HubSource().fetch(snapshot, dest, None)
    assert hub.file_get_headers and all(headers.get(counter.lower()) == "1" for headers in hub.file_get_headers)


@pytest.mark.parametrize("change", ["reshaped", "removed"])
def test_a_huggingface_hub_without_the_expected_http_get_still_downloads(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, change: str
) -> None:
    source = _publish(hub, tmp_path)
    snapshot = HubSource().resolve(AdapterRef("hub", "org/adapter"), None)
    if change == "reshaped":  # a release that renames a parameter
        every_file = threading.Barrier(len(snapshot.files))

        def http_get(*args: object, **kwargs: object) -> None:
            every_file.wait(timeout=5)  # all files' threads fail at the same moment: still one warning
            raise TypeError("http_get() got an unexpected keyword argument 'expected_size'")

        monkeypatch.setattr(sources, "_hf_http_get", lambda: http_get)
    else:  # a release that moves it out of file_download

        def moved() -> None:
            raise ImportError("cannot import name 'http_get' from 'huggingface_hub.file_download'")

        monkeypatch.setattr(sources, "_hf_http_get", moved)
    fetching = HubSource()
    for attempt in range(2):
        dest = tmp_path / f"dest{attempt}"
        dest.mkdir()
        fetching.fetch(snapshot, dest, None)
        for file in snapshot.files:
            assert (dest / file.name).read_bytes() == (source / file.name).read_bytes()
    assert "HEAD" in _resolve_requests(hub)  # through hf_hub_download
    assert caplog.text.count("http_get is not what loraserve expects") == 1  # said once, not per file
