"""Fixtures the adapter-cache tests share."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def other_process() -> Iterator[int]:
    """A live process other than this one (a server sharing the cache folder)."""
    process = subprocess.Popen(["sleep", "120"])
    try:
        yield process.pid
    finally:
        process.kill()
        process.wait()
