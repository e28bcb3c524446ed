"""Parse and validate what a request names in `model`, before anything touches disk or network.

Patterns are applied with ``fullmatch``: ``re.match`` with ``$`` also accepts a
trailing newline, and "acme/x\\n" then reached the Hub.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from loraserve.errors import ModelNotFound

# "merged": an adapter merged from others (adapters/merge.py); named by its inputs, never by a request.
SourceKind = Literal["hub", "local", "s3", "merged"]

# Hub repo ids: "org/name", each part a conservative subset of what the Hub allows.
_HUB_PART = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_])?"
_HUB_ID = re.compile(rf"^{_HUB_PART}/{_HUB_PART}$")
# Branch, tag or commit: no "..", no leading "/" or "-", no control characters.
_REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._/-]{0,199}$")
_LOCAL_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,199}$")
_S3 = re.compile(r"^s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])/([A-Za-z0-9!_.*'()/-]{1,900})$")


@dataclass(frozen=True)
class AdapterRef:
    source: SourceKind
    name: str  # hub: org/name; local: relative path under an adapter root; s3: s3://bucket/prefix
    revision: str | None = None  # hub only

    def display(self) -> str:
        return f"{self.name}@{self.revision}" if self.revision else self.name


def parse_ref(model: str, source: SourceKind) -> AdapterRef:
    """Turn a request's `model` into a reference, or 404 without any I/O."""
    if source == "merged":
        raise ModelNotFound(model)
    if source == "hub":
        name, _, revision = model.partition("@")
        if not _HUB_ID.fullmatch(name) or ".." in name:
            raise ModelNotFound(model)
        if revision and (not _REVISION.fullmatch(revision) or ".." in revision or "//" in revision):
            raise ModelNotFound(model)
        return AdapterRef("hub", name, revision or None)
    if source == "local":
        parts = model.split("/")
        if not model or any(not _LOCAL_PART.fullmatch(p) or p in (".", "..") for p in parts):
            raise ModelNotFound(model)
        return AdapterRef("local", model)
    match = _S3.fullmatch(model)
    if match is None or ".." in match.group(2).split("/") or "//" in match.group(2):
        raise ModelNotFound(model)
    return AdapterRef("s3", model.rstrip("/"))


def split_spec(spec: str) -> tuple[SourceKind, str]:
    """An adapter as the command line names it (--preload-adapter, `loraserve adapters`): ``org/name[@rev]``
    on the Hub, ``local:NAME`` under --adapter-dir, or ``s3://bucket/prefix``."""
    if spec.startswith("local:"):
        return "local", spec.removeprefix("local:")
    if spec.startswith("s3://"):
        return "s3", spec
    if spec.startswith("merged:"):  # a merged adapter in the cache (`loraserve adapters rm merged:…`)
        return "merged", spec
    return "hub", spec
