"""S3 through boto3 against moto's S3-compatible server on loopback (real HTTP, AWS_ENDPOINT_URL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer

from loraserve.adapters.ref import parse_ref
from loraserve.adapters.sources import S3Source
from loraserve.errors import ModelNotFound, SourceUnavailable
from tests.support.server import free_port
from tests.unit.adapters.helpers import write_adapter


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    for key, value in {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    try:
        yield endpoint
    finally:
        server.stop()


def _upload(folder: Path, bucket: str, prefix: str) -> None:
    client = boto3.client("s3")
    client.create_bucket(Bucket=bucket)
    for path in folder.iterdir():
        client.upload_file(str(path), bucket, f"{prefix}/{path.name}")


def test_an_adapter_in_s3_resolves_and_downloads(s3_endpoint: str, tmp_path: Path) -> None:
    _upload(write_adapter(tmp_path / "a"), "loras", "team/a")
    source = S3Source()
    snapshot = source.resolve(parse_ref("s3://loras/team/a", "s3"), None)
    assert {f.name for f in snapshot.files} == {"adapter_config.json", "adapter_model.safetensors"}
    dest = tmp_path / "dest"
    dest.mkdir()
    source.fetch(snapshot, dest, None)
    assert (dest / "adapter_model.safetensors").read_bytes() == (tmp_path / "a/adapter_model.safetensors").read_bytes()
    # Same objects, same version: the cache key is stable.
    assert source.resolve(parse_ref("s3://loras/team/a", "s3"), None).version == snapshot.version


def test_missing_bucket_or_prefix_is_not_found(s3_endpoint: str, tmp_path: Path) -> None:
    _upload(write_adapter(tmp_path / "a"), "loras", "team/a")
    for name in ("s3://nobucket/x", "s3://loras/team/missing"):
        with pytest.raises(ModelNotFound):
            S3Source().resolve(parse_ref(name, "s3"), None)


def test_unreachable_s3_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(SourceUnavailable):
        S3Source().resolve(parse_ref("s3://loras/team/a", "s3"), None)
