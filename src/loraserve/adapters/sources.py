"""Where adapters come from: the Hugging Face Hub, local folders, S3.

Each source resolves a reference to a pinned ``Snapshot`` (a commit, or a
content hash) listing the files to fetch, then fetches them into a folder.
Both calls block; the store runs them in threads. Only the files an adapter
needs are fetched: its config, its safetensors weights, and tokenizer files
that may carry its own chat template. Pickles are never fetched.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from loraserve.adapters.ref import AdapterRef
from loraserve.adapters.validate import CONFIG, PICKLED_WEIGHTS, WEIGHTS
from loraserve.errors import InvalidAdapter, ModelNotFound, SourceUnavailable

logger = logging.getLogger(__name__)

# Seconds one call to a source may take (--adapter-source-timeout).
DEFAULT_TIMEOUT_S = 20.0

# Hub files up to this size are fetched with one plain GET; larger ones through hf_hub_download (Xet when it can).
DIRECT_GET_LIMIT = 64 * 1024 * 1024
# Waits before each new attempt at a file the Hub answered with a 5xx.
RETRY_WAITS_S = (0.5, 1.0, 2.0)

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
WANTED = frozenset({CONFIG, WEIGHTS, *TOKENIZER_FILES})


@dataclass(frozen=True)
class RemoteFile:
    name: str
    size: int


@dataclass(frozen=True)
class Snapshot:
    """One immutable version of an adapter: what the cache stores under one key."""

    ref: AdapterRef
    version: str  # hub: the commit sha; local and s3: a hash of names, sizes and stamps
    files: tuple[RemoteFile, ...]
    public: bool  # readable without a per-request token

    @property
    def total_size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.ref.source}:{self.ref.name}@{self.version}".encode()).hexdigest()[:32]

    @property
    def root(self) -> str:
        """The source reference with the pinned version, as /v1/models shows it."""
        return f"{self.ref.name}@{self.version}"


class Source(Protocol):
    def resolve(self, ref: AdapterRef, token: str | None) -> Snapshot: ...

    def fetch(self, snapshot: Snapshot, dest: Path, token: str | None) -> None: ...


def _select(ref: AdapterRef, names_and_sizes: Iterable[tuple[str, int]]) -> tuple[RemoteFile, ...]:
    available = dict(names_and_sizes)
    if CONFIG not in available:
        raise InvalidAdapter(f"{ref.display()} is not a PEFT adapter: it has no {CONFIG}")
    if WEIGHTS not in available:
        if any(name in available for name in PICKLED_WEIGHTS):
            raise InvalidAdapter(
                f"{ref.display()} ships only pickled weights (adapter_model.bin), which are never loaded because "
                "unpickling runs code; publish adapter_model.safetensors"
            )
        raise InvalidAdapter(f"{ref.display()} has no {WEIGHTS}")
    return tuple(RemoteFile(name, size) for name, size in sorted(available.items()) if name in WANTED)


class HubSource:
    """The Hugging Face Hub through huggingface_hub (HF_ENDPOINT, HF_TOKEN, HF_HOME, HF_HUB_OFFLINE apply).

    Every metadata call carries ``timeout_s``: huggingface_hub sets none on them, so a Hub that accepts the
    connection and never answers would hold a request and a worker thread for ever. File bodies are read with
    huggingface_hub's own read timeout (``HF_HUB_DOWNLOAD_TIMEOUT``), and resumed by it after a dropped connection.
    """

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, direct_limit: int = DIRECT_GET_LIMIT) -> None:
        self.timeout_s = timeout_s
        self.direct_limit = direct_limit
        self._direct = True  # small files by one plain GET; False once huggingface_hub's http_get did not fit
        self._fallback_lock = threading.Lock()

    def resolve(self, ref: AdapterRef, token: str | None) -> Snapshot:
        from huggingface_hub import HfApi, get_hf_file_metadata, hf_hub_url

        with _hub_errors(ref):
            api = HfApi()
            info = api.model_info(
                ref.name, revision=ref.revision, files_metadata=True, token=token, timeout=self.timeout_s
            )
            if info.gated and info.sha:
                # Anyone may read a gated repo's metadata; only granted tokens may read its files
                # (asked for one file: HfApi.auth_check takes no timeout).
                url = hf_hub_url(ref.name, CONFIG, revision=info.sha)
                get_hf_file_metadata(url, token=token, timeout=self.timeout_s)
        if not info.sha:
            raise SourceUnavailable(f"The Hub did not say which commit {ref.display()} is at; try again later.")
        siblings = [(s.rfilename, int(s.size or 0)) for s in info.siblings or ()]
        # A gated repo's metadata is readable by anyone, its files are not: only open repos are public.
        return Snapshot(ref, info.sha, _select(ref, siblings), public=not info.private and not info.gated)

    def fetch(self, snapshot: Snapshot, dest: Path, token: str | None) -> None:
        from huggingface_hub import constants, hf_hub_download, hf_hub_url
        from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]  # a lazy re-export

        headers = build_hf_headers(token=token)
        counter = getattr(constants, "X_HF_DOWNLOAD_COUNTER", None)
        if counter:  # what huggingface_hub's own downloads send (flag_as_download_call): publishers see the download
            headers[counter] = "1"

        def download(file: RemoteFile) -> None:
            with _hub_errors(snapshot.ref):
                if self._direct and 0 < file.size <= self.direct_limit:
                    # One GET at the pinned commit: resolve already listed the files and their sizes, so
                    # hf_hub_download's metadata request, file lock and bookkeeping files would only add a round
                    # trip and CPU to every first request (about half of a small adapter's fetch on loopback).
                    url = hf_hub_url(snapshot.ref.name, file.name, revision=snapshot.version)
                    try:
                        _get_file(url, dest / file.name, headers, file.size)
                        return
                    except (ImportError, AttributeError, TypeError):
                        # http_get is huggingface_hub's internal, not its public API: should a release move or
                        # reshape it, every adapter would fail as "Hub unreachable". The public path still works.
                        with self._fallback_lock:  # files are fetched in parallel: say it once
                            first, self._direct = self._direct, False
                        if first:
                            logger.warning(
                                "huggingface_hub's http_get is not what loraserve expects; downloading through "
                                "hf_hub_download from now on (slower for small files)",
                                exc_info=True,
                            )
                        (dest / file.name).unlink(missing_ok=True)
                # Large (or unsized) files: huggingface_hub's full path, which uses Xet storage when it can.
                hf_hub_download(
                    snapshot.ref.name,
                    file.name,
                    revision=snapshot.version,
                    token=token,
                    local_dir=str(dest),
                    etag_timeout=self.timeout_s,
                )

        # All files at once: a first request waits for all of them. The first error (in file order) is raised once
        # every download has ended.
        with ThreadPoolExecutor(max_workers=max(1, len(snapshot.files)), thread_name_prefix="hub-fetch") as pool:
            for done in [pool.submit(download, file) for file in snapshot.files]:
                done.result()
        # hf_hub_download keeps bookkeeping beside local_dir downloads; the entry needs none of it.
        shutil.rmtree(dest / ".cache", ignore_errors=True)


def _get_file(url: str, path: Path, headers: dict[str, str], size: int) -> None:
    """``url`` into ``path`` with huggingface_hub's ``http_get`` (size check, resumes after a dropped connection).

    ``http_get`` retries only 408 and 429; a 5xx from the Hub or its CDN is retried here a few times, as
    ``hf_hub_download`` retries its metadata request, before the fetch fails.
    """
    from huggingface_hub.errors import HfHubHTTPError

    http_get = _hf_http_get()
    for wait_s in (*RETRY_WAITS_S, None):
        try:
            with open(path, "wb") as out:  # each attempt starts the file anew
                http_get(url, out, headers=headers, expected_size=size)
            return
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if wait_s is None or status < 500:
                raise
            logger.info("Hub answered %d for %s; trying again in %.1f s", status, path.name, wait_s)
            time.sleep(wait_s)


def _hf_http_get() -> Callable[..., None]:
    """huggingface_hub's own streaming GET: an internal of ``file_download``, not part of its public API."""
    from huggingface_hub.file_download import http_get

    return http_get


@contextmanager
def _hub_errors(ref: AdapterRef) -> Iterator[None]:
    """Map huggingface_hub's failures to ours, without leaking whether a private repo exists."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    unreachable = f"The Hub is unreachable for {ref.display()}; try again later."
    try:
        yield
    except LocalEntryNotFoundError as exc:  # "could not reach the Hub, and the file is not cached"
        raise SourceUnavailable(unreachable) from exc
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError, EntryNotFoundError) as exc:
        raise ModelNotFound(ref.display()) from exc
    except HFValidationError as exc:  # a name the Hub cannot have: not the Hub's fault
        raise ModelNotFound(ref.display()) from exc
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code in (401, 403):
            raise ModelNotFound(ref.display()) from exc
        logger.warning("Hub error for %s: %s", ref.display(), type(exc).__name__)
        raise SourceUnavailable(unreachable) from exc
    except Exception as exc:  # offline mode, timeouts, refused connections: the HTTP client varies by version
        logger.warning("Hub unreachable for %s: %s", ref.display(), type(exc).__name__)
        raise SourceUnavailable(unreachable) from exc


class LocalSource:
    """Folders under the --adapter-dir roots; nothing outside them is ever read."""

    def __init__(self, roots: list[Path]) -> None:
        self._roots = [root.resolve() for root in roots]

    def resolve(self, ref: AdapterRef, token: str | None) -> Snapshot:
        folder = self._find(ref)
        stamps: list[tuple[str, int, int]] = []
        for path in sorted(folder.iterdir()):
            if path.name in WANTED or path.name in PICKLED_WEIGHTS:
                stat = path.stat()
                stamps.append((path.name, stat.st_size, stat.st_mtime_ns))
        digest = hashlib.sha256(repr(stamps).encode()).hexdigest()[:40]
        return Snapshot(ref, digest, _select(ref, ((n, s) for n, s, _ in stamps)), public=True)

    def fetch(self, snapshot: Snapshot, dest: Path, token: str | None) -> None:
        folder = self._find(snapshot.ref)
        for file in snapshot.files:
            shutil.copyfile(folder / file.name, dest / file.name)

    def name_of(self, path: Path) -> str | None:
        """The local reference of an absolute folder inside a root (None when it is outside every root)."""
        resolved = path.resolve()
        for root in self._roots:
            if resolved.is_relative_to(root) and resolved != root:
                return resolved.relative_to(root).as_posix()
        return None

    def _find(self, ref: AdapterRef) -> Path:
        for root in self._roots:
            candidate = (root / ref.name).resolve()
            # resolve() follows symlinks: a link that leads out of the root is refused.
            if candidate.is_relative_to(root) and candidate.is_dir():
                for path in candidate.iterdir():
                    if path.name in WANTED and not path.resolve().is_relative_to(root):
                        raise ModelNotFound(ref.name)
                return candidate
        raise ModelNotFound(ref.name)


class S3Source:
    """``s3://bucket/prefix`` through boto3 (AWS_* variables, AWS_ENDPOINT_URL included)."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._client: Any = None

    def _s3(self) -> Any:
        if self._client is None:
            import boto3
            from botocore.config import Config

            timeouts = Config(connect_timeout=self.timeout_s, read_timeout=self.timeout_s, retries={"max_attempts": 2})
            self._client = boto3.client("s3", config=timeouts)
        return self._client

    @staticmethod
    def _split(ref: AdapterRef) -> tuple[str, str]:
        bucket, _, prefix = ref.name.removeprefix("s3://").partition("/")
        return bucket, prefix.rstrip("/") + "/"

    def resolve(self, ref: AdapterRef, token: str | None) -> Snapshot:
        bucket, prefix = self._split(ref)
        with _s3_errors(ref):
            listing = self._s3().list_objects_v2(Bucket=bucket, Prefix=prefix, Delimiter="/")
        objects = listing.get("Contents", [])
        if not objects:
            raise ModelNotFound(ref.name)
        files = [(obj["Key"][len(prefix) :], int(obj["Size"])) for obj in objects]
        stamps = sorted((obj["Key"], obj.get("ETag", ""), int(obj["Size"])) for obj in objects)
        digest = hashlib.sha256(repr(stamps).encode()).hexdigest()[:40]
        return Snapshot(ref, digest, _select(ref, files), public=True)

    def fetch(self, snapshot: Snapshot, dest: Path, token: str | None) -> None:
        bucket, prefix = self._split(snapshot.ref)
        for file in snapshot.files:
            with _s3_errors(snapshot.ref):
                self._s3().download_file(bucket, prefix + file.name, str(dest / file.name))


@contextmanager
def _s3_errors(ref: AdapterRef) -> Iterator[None]:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        yield
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchBucket", "NoSuchKey", "AccessDenied", "404", "403", "InvalidBucketName"):
            raise ModelNotFound(ref.name) from exc
        logger.warning("S3 error for %s: %s", ref.name, code)
        raise SourceUnavailable(f"S3 is unreachable for {ref.name}; try again later.") from exc
    except (BotoCoreError, OSError) as exc:
        logger.warning("S3 unreachable for %s: %s", ref.name, type(exc).__name__)
        raise SourceUnavailable(f"S3 is unreachable for {ref.name}; try again later.") from exc
