"""`response_format` → a decoding constraint, with the schema checked before the engine sees it."""

from __future__ import annotations

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError

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
    return schema


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
