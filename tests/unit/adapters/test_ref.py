from __future__ import annotations

import pytest

from loraserve.adapters.ref import AdapterRef, parse_ref
from loraserve.errors import ModelNotFound


def test_hub_names_and_revisions_parse() -> None:
    assert parse_ref("org/name", "hub") == AdapterRef("hub", "org/name")
    assert parse_ref("org/name@v1.0", "hub") == AdapterRef("hub", "org/name", "v1.0")
    sha = "a" * 40
    assert parse_ref(f"org/my-adapter_2@{sha}", "hub").revision == sha


@pytest.mark.parametrize(
    "name",
    ["../x", "org/..", "/etc/passwd", "org/name/../../x", "org/name@../x", "org", "org/na me", "org//name", "", "~/x"],
)
def test_traversal_and_malformed_hub_names_are_not_found(name: str) -> None:
    with pytest.raises(ModelNotFound):
        parse_ref(name, "hub")


@pytest.mark.parametrize("name", ["../x", "a/../../x", "/abs/path", "a//b", ".", "a/./b", "", "~root"])
def test_local_names_cannot_leave_their_root(name: str) -> None:
    with pytest.raises(ModelNotFound):
        parse_ref(name, "local")


def test_s3_names() -> None:
    assert parse_ref("s3://bucket/adapters/a", "s3") == AdapterRef("s3", "s3://bucket/adapters/a")
    for bad in ("s3://bucket/../x", "http://bucket/x", "s3://B/x", "s3://bucket"):
        with pytest.raises(ModelNotFound):
            parse_ref(bad, "s3")


@pytest.mark.parametrize(
    ("name", "source"),
    [
        ("acme/good-1\n", "hub"),
        ("acme/good-1@main\n", "hub"),
        ("acme/good-1\r", "hub"),
        ("plain\n", "local"),
        ("team/plain\n", "local"),
        ("s3://bucket/adapters/a\n", "s3"),
    ],
)
def test_a_trailing_newline_is_not_part_of_any_valid_name(name: str, source: str) -> None:
    # `$` in a Python regex also matches before a final newline: names must match whole.
    with pytest.raises(ModelNotFound):
        parse_ref(name, source)  # type: ignore[arg-type]
