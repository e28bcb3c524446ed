"""The fake Hub against the real huggingface_hub client (no vLLM, a few seconds).

huggingface_hub reads ``HF_ENDPOINT`` only when it is imported, so monkeypatching the variable here would not reach it:
these tests pass ``endpoint=hub.url`` (which ``hf_hub_download``, ``snapshot_download`` and ``HfApi`` accept), and
``test_default_endpoint_can_be_patched`` shows ``patch_default_endpoint`` for code that does not pass it.
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    HfHubHTTPError,
    LocalEntryNotFoundError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.support.fake_hub import FakeHub, patch_default_endpoint

REPO = "org/adapter"
WEIGHTS = bytes(range(256)) * 40  # 10 KiB, LFS-tracked by suffix


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    with FakeHub() as running:
        yield running


def _folder(root: Path, config: str) -> Path:
    root.mkdir(parents=True)
    (root / "adapter_config.json").write_text(config)
    (root / "adapter_model.safetensors").write_bytes(WEIGHTS)
    return root


def _download(
    hub: FakeHub, cache: Path, filename: str, *, revision: str | None = None, token: bool | str = False
) -> Path:
    # token=False by default: never send a token the machine may have lying around.
    return Path(hf_hub_download(REPO, filename, revision=revision, endpoint=hub.url, cache_dir=cache, token=token))


def test_model_info_reports_sha_sizes_and_lfs(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.add_repo(REPO, _folder(tmp_path / "v1", '{"r": 8}'))
    hub.add_tag(REPO, "v1.0", sha)
    api = HfApi(endpoint=hub.url, token=False)

    info = api.model_info(REPO, files_metadata=True)

    assert info.id == REPO and info.sha == sha and info.private is False
    siblings = {sibling.rfilename: sibling for sibling in info.siblings or []}
    assert siblings["adapter_config.json"].size == 8 and siblings["adapter_config.json"].lfs is None
    weights = siblings["adapter_model.safetensors"]
    assert weights.size == len(WEIGHTS) and weights.lfs is not None and weights.lfs.size == len(WEIGHTS)
    for revision in ("v1.0", sha):
        assert api.model_info(REPO, revision=revision).sha == sha
    assert hub.api_calls[REPO] == 3


def test_download_at_branch_and_sha_and_moved_branch(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.add_repo(REPO, _folder(tmp_path / "v1", '{"r": 8}'))
    cache = tmp_path / "cache"

    at_branch = _download(hub, cache, "adapter_config.json")
    assert at_branch.read_text() == '{"r": 8}' and old in at_branch.parts
    assert _download(hub, cache, "adapter_model.safetensors", revision=old).read_bytes() == WEIGHTS

    new = hub.add_repo(REPO, _folder(tmp_path / "v2", '{"r": 16}'))
    assert new != old
    assert HfApi(endpoint=hub.url, token=False).model_info(REPO).sha == new
    assert _download(hub, cache, "adapter_config.json").read_text() == '{"r": 16}'
    # The old commit is still served by sha, even with a fresh cache.
    assert _download(hub, tmp_path / "other", "adapter_config.json", revision=old).read_text() == '{"r": 8}'


def test_branch_with_slash_is_url_encoded(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    sha = hub.add_repo(REPO, _folder(tmp_path / "pr", '{"pr": 1}'), branch="refs/pr/1")

    assert HfApi(endpoint=hub.url, token=False).model_info(REPO, revision="refs/pr/1").sha == sha
    assert _download(hub, tmp_path / "cache", "adapter_config.json", revision="refs/pr/1").read_text() == '{"pr": 1}'


def test_hits_count_body_downloads_only(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    cache = tmp_path / "cache"

    _download(hub, cache, "adapter_model.safetensors")
    _download(hub, cache, "adapter_model.safetensors")  # cached: a HEAD to resolve "main", no GET
    _download(hub, cache, "adapter_model.safetensors", revision=sha)  # cached commit: no request at all

    assert hub.hits[(REPO, "adapter_model.safetensors")] == 1
    assert hub.completed[(REPO, "adapter_model.safetensors")] == 1
    assert [method for method, _ in hub.request_log] == ["HEAD", "GET", "HEAD"]


def test_private_repo_needs_its_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"), private=True, token="hf_secret")
    cache = tmp_path / "cache"

    for token in (False, "hf_wrong"):
        with pytest.raises(RepositoryNotFoundError):
            HfApi(endpoint=hub.url).model_info(REPO, token=token)
        with pytest.raises(RepositoryNotFoundError):
            _download(hub, cache, "adapter_config.json", token=token)
    assert hub.hits[(REPO, "adapter_config.json")] == 0

    assert HfApi(endpoint=hub.url).model_info(REPO, token="hf_secret").private is True
    assert _download(hub, cache, "adapter_config.json", token="hf_secret").read_text() == "{}"


def test_unknown_repo_revision_and_file(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    api = HfApi(endpoint=hub.url, token=False)
    cache = tmp_path / "cache"

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "x", endpoint=hub.url, cache_dir=cache, token=False)
    with pytest.raises(RevisionNotFoundError):
        api.model_info(REPO, revision="nope")
    with pytest.raises(RevisionNotFoundError):
        _download(hub, cache, "adapter_config.json", revision="nope")
    with pytest.raises(RemoteEntryNotFoundError):
        _download(hub, cache, "missing.json")


def test_hub_down(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    cache = tmp_path / "cache"
    _download(hub, cache, "adapter_config.json")
    hub.down = True

    with pytest.raises(HfHubHTTPError) as info:
        HfApi(endpoint=hub.url, token=False).model_info(REPO)
    assert info.value.response.status_code == 503
    # Already cached: served from disk, by branch (the failed HEAD falls back to refs/main) and by sha.
    assert _download(hub, cache, "adapter_config.json").read_text() == "{}"
    assert _download(hub, cache, "adapter_config.json", revision=sha).read_text() == "{}"

    # Not cached: hf_hub_download retries the HEAD 5 times with back-off (1+2+4+8+8 s); skip the sleeps.
    http = importlib.import_module("huggingface_hub.utils._http")
    monkeypatch.setattr(http, "time", types.SimpleNamespace(sleep=lambda _seconds: None))
    hub.request_log.clear()
    with pytest.raises(LocalEntryNotFoundError) as error:
        _download(hub, cache, "adapter_model.safetensors")
    assert isinstance(error.value.__cause__, HfHubHTTPError)
    assert [method for method, _ in hub.request_log] == ["HEAD"] * 7


def test_range_and_slow_body(hub: FakeHub, tmp_path: Path) -> None:
    hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    url = f"{hub.url}/{REPO}/resolve/main/adapter_model.safetensors"

    partial = httpx.get(url, headers={"Range": "bytes=100-"})
    assert partial.status_code == 206 and partial.content == WEIGHTS[100:]
    assert partial.headers["content-range"] == f"bytes 100-{len(WEIGHTS) - 1}/{len(WEIGHTS)}"
    assert httpx.get(url, headers={"Range": f"bytes={len(WEIGHTS)}-"}).status_code == 416

    # A slow body arrives in pieces: a client that gives up half-way never completes the download.
    hub.file_delay = 0.4
    with httpx.stream("GET", url) as response:
        first = next(response.iter_raw())
    assert 0 < len(first) < len(WEIGHTS)
    assert hub.hits[(REPO, "adapter_model.safetensors")] == 2  # the 206 and this one; the 416 sent no body
    assert hub.completed[(REPO, "adapter_model.safetensors")] == 1


def test_snapshot_download(hub: FakeHub, tmp_path: Path) -> None:
    source = _folder(tmp_path / "v1", "{}")
    (source / "nested").mkdir()
    (source / "nested" / "notes.txt").write_text("hi")
    sha = hub.add_repo(REPO, source)

    folder = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=tmp_path / "cache", token=False))

    assert folder.name == sha
    assert (folder / "nested" / "notes.txt").read_text() == "hi"
    assert (folder / "adapter_model.safetensors").read_bytes() == WEIGHTS


def test_default_endpoint_can_be_patched(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sha = hub.add_repo(REPO, _folder(tmp_path / "v1", "{}"))
    patch_default_endpoint(monkeypatch, hub.url)
    import huggingface_hub

    assert huggingface_hub.model_info(REPO, token=False).sha == sha
    assert HfApi(token=False).model_info(REPO).sha == sha
    path = hf_hub_download(REPO, "adapter_config.json", cache_dir=tmp_path / "cache", token=False)
    assert Path(path).read_text() == "{}"
