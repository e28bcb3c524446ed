"""A real HTTP server speaking the slice of the Hugging Face Hub protocol that huggingface_hub's download code uses.

The real client code (``hf_hub_download``, ``snapshot_download``, ``HfApi.model_info`` ...) runs unmodified against
it, so tests exercise the same requests, headers and error mapping as production. Implemented from the installed
huggingface_hub 2.4.0 source:

* ``HEAD``/``GET /{org}/{name}/resolve/{revision}/{filename}`` -- ``get_hf_file_metadata`` needs ``X-Repo-Commit``
  and ``ETag`` (``X-Linked-Etag``/``X-Linked-Size`` win when present), then ``http_get`` streams the body and resumes
  with ``Range: bytes=N-`` after a dropped connection. No redirects and no Xet headers, so plain HTTP is used.
* ``GET /api/models/{org}/{name}[/revision/{revision}]`` -- ``model_info``/``repo_info`` (``?blobs=true`` adds sizes,
  blob ids and LFS info to ``siblings``).
* ``GET /api/models/{org}/{name}/tree/{revision}[/{path}]`` -- ``list_repo_tree``, which ``snapshot_download`` calls.

Errors follow ``hf_raise_for_status``: the ``X-Error-Code`` header picks the exception, because its status-only
fallback (401 -> RepositoryNotFoundError) matches ``https://`` urls only, never this ``http://`` server.

* unknown or private-without-the-right-token repo: 401 (anonymous) or 404 (with a token), ``RepoNotFound``
  -> ``RepositoryNotFoundError``; both cases look identical, as on the real Hub.
* unknown revision: 404 ``RevisionNotFound`` -> ``RevisionNotFoundError``.
* unknown file: 404 ``EntryNotFound`` (with ``X-Repo-Commit``, so the client caches the miss)
  -> ``RemoteEntryNotFoundError``.
* ``failing_file_gets = N``: the next N GETs of a file's body answer 503.
* ``down = True``: 503 everywhere -> ``HfHubHTTPError`` from ``model_info``; ``hf_hub_download`` retries the HEAD with
  back-off (~23 s of sleeps) and then raises ``LocalEntryNotFoundError``, unless the file is already cached.

Revisions arrive percent-encoded as one path segment (``refs%2Fpr%2F1``), so routing works on the raw path.

Pointing the client at it: ``hf_hub_download``, ``snapshot_download`` and ``HfApi`` all accept ``endpoint=hub.url``.
``HF_ENDPOINT`` is read once, when huggingface_hub is imported, so setting it later only reaches subprocesses (e.g. the
server under test); for in-process code that does not pass ``endpoint=``, use :func:`patch_default_endpoint`.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

if TYPE_CHECKING:
    import pytest

# Suffixes the Hub's default .gitattributes stores in LFS; LFS files get a sha256 ETag like on the real Hub.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".onnx", ".h5", ".msgpack")
# Size of a git-lfs pointer file; ModelInfo/RepoFile refuse an ``lfs`` dict without ``pointerSize``.
LFS_POINTER_SIZE = 134
_CHUNK = 1 << 20
_SLOW_CHUNKS = 4  # a delayed body arrives in this many pieces, so a client can die half-way through


@dataclass(frozen=True)
class Blob:
    content: bytes
    git_oid: str  # git blob sha1: the Hub's ``blobId`` and the ETag of non-LFS files
    sha256: str
    lfs: bool

    @classmethod
    def of(cls, name: str, content: bytes) -> Blob:
        git_oid = hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()
        return cls(content, git_oid, hashlib.sha256(content).hexdigest(), name.endswith(LFS_SUFFIXES))

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.git_oid


@dataclass(frozen=True)
class Commit:
    sha: str
    files: dict[str, Blob]
    date: datetime


@dataclass
class Repo:
    repo_id: str
    private: bool
    token: str | None
    created: datetime
    gated: bool = False  # metadata for anyone, files only with the repo's token
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        sha = self.branches.get(revision) or self.tags.get(revision) or revision
        return self.commits.get(sha)


def patch_default_endpoint(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """Point in-process huggingface_hub calls made *without* ``endpoint=`` at ``url``; sets HF_ENDPOINT for children.

    huggingface_hub reads HF_ENDPOINT once, at import, into ``constants.ENDPOINT`` and the resolve-url template, and the
    module-level ``huggingface_hub.model_info`` & co. are bound to an ``HfApi`` built at import too: patch all three.
    """
    from huggingface_hub import constants, hf_api

    monkeypatch.setenv("HF_ENDPOINT", url)
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hf_api.api, "endpoint", url)


def _iso(moment: datetime) -> str:
    # The Hub's format; huggingface_hub's parse_datetime expects the trailing "Z".
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


def _error(status: int, code: str | None, message: str, headers: dict[str, str] | None = None) -> Response:
    extra = dict(headers or {})
    extra["X-Error-Message"] = message
    if code is not None:
        extra["X-Error-Code"] = code
    return JSONResponse({"error": message}, status_code=status, headers=extra)


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """Inclusive (start, end) of one ``bytes=`` range; None if unsatisfiable; ValueError if it should be ignored."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        raise ValueError(header)  # multi-range or other units: answering 200 with the whole body is allowed
    first, _, last = spec.strip().partition("-")
    if not first:
        suffix = int(last)
        return (max(size - suffix, 0), size - 1) if suffix > 0 and size > 0 else None
    start = int(first)
    end = min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true")


class FakeHub:
    """In-process Hub on 127.0.0.1. Pass ``hub.url`` as ``endpoint=`` (or ``HF_ENDPOINT`` to a subprocess)."""

    def __init__(self) -> None:
        self.url = ""
        self.hits: collections.Counter[tuple[str, str]] = collections.Counter()  # GET resolve that sent a body
        self.completed: collections.Counter[tuple[str, str]] = collections.Counter()  # ... and sent all of it
        self.api_calls: collections.Counter[str] = collections.Counter()  # model_info/repo_info calls per repo
        self.request_log: list[tuple[str, str]] = []  # (method, raw path) of every request, even while down
        self.down = False
        self.file_delay = 0.0
        self.failing_file_gets = 0  # the next this many GETs of a file's body answer 503 (a Hub or CDN hiccup)
        self.file_get_headers: list[dict[str, str]] = []  # the request headers of every GET of a file's body
        self.bodies_in_flight = 0  # file bodies being streamed now
        self.most_bodies_in_flight = 0  # ... at most, since start: shows whether a client fetched files at once
        self._repos: dict[str, Repo] = {}
        self._lock = threading.Lock()  # repos are mutated from the test thread and read from the server's loop
        self._sequence = 0
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self._app = Starlette(routes=[Route("/{rest:path}", self._dispatch, methods=["GET", "HEAD"])])

    # --- lifecycle -------------------------------------------------------------------------------------------------

    def start(self) -> str:
        if self._server is not None:
            return self.url
        # Binding the socket here (port 0) avoids the pick-a-free-port-then-race dance.
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets whose proto says TCP (3.11), and an
        # accepted socket inherits the listener's 0. Without it every response after the first on a kept-alive
        # connection (huggingface_hub keeps them) waits ~40 ms: headers and body are two writes, Nagle holds
        # the body until the client's delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            self._app, log_level="warning", access_log=False, lifespan="off", loop="asyncio",
            timeout_graceful_shutdown=1,  # a slow download in flight must not hold stop() hostage
        )  # fmt: skip
        server = uvicorn.Server(config)
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="fake-hub", daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("fake hub did not start")
            time.sleep(0.005)
        self._server, self._thread, self._socket = server, thread, sock
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None

    def __enter__(self) -> FakeHub:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- content ---------------------------------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        folder: Path,
        *,
        private: bool = False,
        token: str | None = None,
        branch: str = "main",
        gated: bool = False,
    ) -> str:
        """Commit every file under ``folder`` to ``branch`` (creating the repo) and return the new commit sha.

        ``private``/``token`` only apply when the repo is created. Earlier commits stay downloadable by sha.
        """
        if repo_id.count("/") != 1:
            raise ValueError(f"repo ids are 'org/name', got {repo_id!r}")
        files = {
            path.relative_to(folder).as_posix(): Blob.of(path.name, path.read_bytes())
            for path in sorted(folder.rglob("*"))
            if path.is_file()
        }
        now = datetime.now(UTC)
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._repos[repo_id] = Repo(repo_id, private, token, now, gated)
            self._sequence += 1
            # Parent + sequence number in the hash: re-adding identical files still makes a new commit, like git.
            tree = "".join(f"{name}\0{blob.git_oid}\n" for name, blob in sorted(files.items()))
            seed = f"{repo_id}\0{branch}\0{repo.branches.get(branch, '')}\0{self._sequence}\0{tree}"
            sha = hashlib.sha1(seed.encode()).hexdigest()
            repo.commits[sha] = Commit(sha, files, now)
            repo.branches[branch] = sha
        return sha

    def add_tag(self, repo_id: str, tag: str, sha: str) -> None:
        with self._lock:
            repo = self._repos[repo_id]
            if sha not in repo.commits:
                raise KeyError(f"{repo_id} has no commit {sha}")
            repo.tags[tag] = sha

    # --- HTTP ------------------------------------------------------------------------------------------------------

    async def _dispatch(self, request: Request) -> Response:
        raw_path = request.scope.get("raw_path") or request.url.path.encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        self.request_log.append((request.method, path))
        if self.down:
            return _error(503, None, "Service Unavailable")
        # Split before unquoting: an encoded "/" inside a revision must stay inside its segment.
        parts = [unquote(part) for part in path.strip("/").split("/")]
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo_id, rest = f"{parts[2]}/{parts[3]}", parts[4:]
            if request.method == "GET" and not rest:
                return self._model_info(request, repo_id, "main")
            if request.method == "GET" and len(rest) >= 2 and rest[0] == "revision":
                return self._model_info(request, repo_id, "/".join(rest[1:]))
            if request.method == "GET" and rest == ["auth-check"]:
                return self._auth_check(request, repo_id)
            if request.method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                return self._tree(request, repo_id, rest[1], "/".join(rest[2:]))
        elif len(parts) >= 4 and parts[2] == "resolve":
            return self._resolve(request, f"{parts[0]}/{parts[1]}", parts[3:])
        return _error(404, None, "Not Found")

    def _repo(self, request: Request, repo_id: str) -> Repo | Response:
        auth = request.headers.get("authorization")
        repo = self._repos.get(repo_id)
        if repo is not None and (not repo.private or (repo.token is not None and auth == f"Bearer {repo.token}")):
            return repo
        # Unknown and forbidden look the same, so a client learns nothing about private repos.
        if auth is None:
            return _error(401, "RepoNotFound", "Invalid username or password.")
        return _error(404, "RepoNotFound", "Repository not found")

    def _gate(self, request: Request, repo: Repo) -> Response | None:
        """A gated repo's files (and its auth-check) need the repo's token: 403 GatedRepo otherwise."""
        if repo.gated and request.headers.get("authorization") != f"Bearer {repo.token}":
            return _error(403, "GatedRepo", f"Access to model {repo.repo_id} is restricted.")
        return None

    def _auth_check(self, request: Request, repo_id: str) -> Response:
        with self._lock:
            repo = self._repo(request, repo_id)
            if isinstance(repo, Response):
                return repo
            refused = self._gate(request, repo)
        return refused or Response(status_code=200)

    def _model_info(self, request: Request, repo_id: str, revision: str) -> Response:
        self.api_calls[repo_id] += 1
        with self._lock:
            repo = self._repo(request, repo_id)
            if isinstance(repo, Response):
                return repo
            commit = repo.resolve(revision)
            if commit is None:
                return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            created = repo.created
            private = repo.private
            gated = repo.gated
        blobs = _truthy(request.query_params.get("blobs"))
        siblings: list[dict[str, Any]] = []
        for name, blob in sorted(commit.files.items()):
            sibling: dict[str, Any] = {"rfilename": name}
            if blobs:
                sibling.update(size=len(blob.content), blobId=blob.git_oid)
                if blob.lfs:
                    sibling["lfs"] = {"sha256": blob.sha256, "size": len(blob.content), "pointerSize": LFS_POINTER_SIZE}
            siblings.append(sibling)
        library = "peft" if "adapter_config.json" in commit.files else "transformers"
        tags = [library] + (["safetensors"] if any(n.endswith(".safetensors") for n in commit.files) else [])
        body = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "modelId": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.sha,
            "lastModified": _iso(commit.date),
            "createdAt": _iso(created),
            "private": private,
            "gated": "auto" if gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "library_name": library,
            "tags": tags,
            "siblings": siblings,
            "spaces": [],
            "usedStorage": sum(len(blob.content) for blob in commit.files.values()),
        }
        return JSONResponse(body)

    def _tree(self, request: Request, repo_id: str, revision: str, path: str) -> Response:
        with self._lock:
            repo = self._repo(request, repo_id)
            if isinstance(repo, Response):
                return repo
            commit = repo.resolve(revision)
        if commit is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        recursive = _truthy(request.query_params.get("recursive"))
        prefix = f"{path.strip('/')}/" if path.strip("/") else ""
        entries: dict[str, dict[str, Any]] = {}
        for name, blob in commit.files.items():
            if not name.startswith(prefix):
                continue
            relative = name[len(prefix) :].split("/")
            # Every folder between ``path`` and the file (only the first one when not recursive).
            for depth in range(1, len(relative) if recursive else min(len(relative), 2)):
                folder = prefix + "/".join(relative[:depth])
                oid = hashlib.sha1(f"{commit.sha}\0{folder}".encode()).hexdigest()
                entries[folder] = {"type": "directory", "oid": oid, "size": 0, "path": folder}
            if recursive or len(relative) == 1:
                entry: dict[str, Any] = {"type": "file", "oid": blob.git_oid, "size": len(blob.content), "path": name}
                if blob.lfs:
                    entry["lfs"] = {"oid": blob.sha256, "size": len(blob.content), "pointerSize": LFS_POINTER_SIZE}
                entries[name] = entry
        if prefix and not entries:
            return _error(404, "EntryNotFound", f"{path} does not exist on {revision}", {"X-Repo-Commit": commit.sha})
        return JSONResponse([entries[key] for key in sorted(entries)])

    def _resolve(self, request: Request, repo_id: str, rest: list[str]) -> Response:
        with self._lock:
            repo = self._repo(request, repo_id)
            if isinstance(repo, Response):
                return repo
            refused = self._gate(request, repo)
            if refused is not None:
                return refused
            # huggingface_hub encodes the revision as one segment; also accept an unencoded "refs/pr/1".
            found: tuple[Commit, str] | None = None
            for k in range(1, len(rest) + 1):
                if (commit := repo.resolve("/".join(rest[:k]))) is not None:
                    found = (commit, "/".join(rest[k:]))
                    break
        if found is None:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rest[0]}")
        commit, filename = found
        blob = commit.files.get(filename)
        if blob is None:
            return _error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit.sha})
        size = len(blob.content)
        headers = {
            "X-Repo-Commit": commit.sha,
            "ETag": f'"{blob.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(size)})
        if request.method == "HEAD":
            return Response(status_code=200, headers={**headers, "Content-Length": str(size)})
        self.file_get_headers.append(dict(request.headers))
        if self.failing_file_gets > 0:
            self.failing_file_gets -= 1  # the server's one event loop answers every request: no lock needed
            return _error(503, None, "Service Unavailable")

        status, start, end = 200, 0, size - 1
        # http_get resumes a dropped download with "Range: bytes=N-".
        if (range_header := request.headers.get("range")) is not None:
            try:
                span = _parse_range(range_header, size)
            except ValueError:
                span = (0, size - 1)  # a range we do not support: the whole file with 200 is a valid answer
            else:
                if span is None:
                    return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
                status = 206
                headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
            start, end = span
        data = blob.content[start : end + 1]
        headers["Content-Length"] = str(len(data))
        key = (repo_id, filename)
        self.hits[key] += 1

        def done() -> None:
            self.completed[key] += 1

        return StreamingResponse(self._stream(data, self.file_delay, done), status_code=status, headers=headers)

    async def _stream(self, data: bytes, delay: float, done: Callable[[], None]) -> AsyncIterator[bytes]:
        size = -(-len(data) // _SLOW_CHUNKS) if delay > 0 else _CHUNK
        pieces = [data[i : i + size] for i in range(0, len(data), max(size, 1))] or [b""]
        self.bodies_in_flight += 1  # the server's one event loop runs every stream: no lock needed
        self.most_bodies_in_flight = max(self.most_bodies_in_flight, self.bodies_in_flight)
        try:
            for piece in pieces:
                if delay > 0:
                    await asyncio.sleep(delay / len(pieces))
                if piece:
                    yield piece
            done()
        finally:
            self.bodies_in_flight -= 1
