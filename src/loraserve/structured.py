"""`response_format` → a decoding constraint, with the schema checked before the engine sees it."""

from __future__ import annotations

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from referencing import Registry, Resource
from referencing.exceptions import Unresolvable
from referencing.jsonschema import DRAFT202012

from loraserve.engine import StructuredOutput
from loraserve.errors import InvalidRequest
from loraserve.protocol.requests import ResponseFormat


def check_schema(schema: object, param: str) -> dict[str, object]:
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be an object.", param=param)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"Invalid JSON schema: {exc.message}", param=param) from exc
    _check_refs(schema, param)
    return schema


def _check_refs(schema: dict[str, object], param: str) -> None:
    """Every `$ref` must point inside the schema: the grammar compiler fails on the others with its own
    internals in the message, and nothing is ever fetched from elsewhere."""
    resolver = Registry().with_resource("", Resource.from_contents(schema, DRAFT202012)).resolver()
    for ref in _refs(schema):
        if not ref.startswith("#"):
            raise InvalidRequest(f"`$ref` {ref!r} points outside the schema; only local references work.", param=param)
        try:
            resolver.lookup(ref)
        except Unresolvable as exc:
            raise InvalidRequest(f"`$ref` {ref!r} points to nothing in the schema.", param=param) from exc


def _refs(node: object) -> list[str]:
    if isinstance(node, dict):
        own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return own + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def response_format_constraint(response_format: ResponseFormat | None) -> StructuredOutput | None:
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return StructuredOutput("json_object")
    assert response_format.json_schema is not None  # the request model checks this
    schema = response_format.json_schema.schema_
    if schema is None:
        return StructuredOutput("json_object")
    return StructuredOutput("json", check_schema(schema, "response_format.json_schema.schema"))
