"""Validation against OpenAI's published OpenAPI spec (the pinned subset in tests/data).

The spec is OpenAPI 3.1, whose schemas are JSON Schema 2020-12, except that some of them still say
``nullable: true`` (OpenAPI 3.0's spelling, which JSON Schema ignores): those are read as "or null"
when loading, as OpenAPI tooling does. Nothing else is changed. Extra fields are allowed where the
spec allows them (it rarely forbids any); every required field must be there with its type.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

SUBSET = Path(__file__).parent / "data" / "openai-openapi-subset.json"


def _nullable(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items()}
    if out.pop("nullable", False):
        kind = out.get("type")
        if isinstance(kind, str):
            out["type"] = [kind, "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        elif isinstance(kind, list):
            out["type"] = [*kind, "null"]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@cache
def _document() -> dict[str, Any]:
    data = json.loads(SUBSET.read_text())
    return {"components": _nullable(data["components"])}


@cache
def _validator(name: str) -> jsonschema.protocols.Validator:
    schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", **_document()}
    schema["$ref"] = f"#/components/schemas/{name}"
    return jsonschema.Draft202012Validator(schema)


def spec_errors(name: str, instance: Any) -> list[str]:
    """What is wrong with ``instance`` as the spec's schema ``name`` (empty: valid)."""
    errors = sorted(_validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
    out = []
    for e in errors:
        where = "/".join(str(p) for p in e.absolute_path) or "(root)"
        # for anyOf / oneOf failures, the deepest member errors say what is actually missing
        detail = "; ".join(sorted({c.message for c in e.context})[:5]) if e.context else ""
        out.append(f"{where}: {e.message[:300]}{' [' + detail + ']' if detail else ''}")
    return out


def assert_valid(name: str, instance: Any) -> None:
    errors = spec_errors(name, instance)
    assert not errors, f"not a valid {name} per OpenAI's spec:\n" + "\n".join(errors[:10])


def event_schema(kind: str) -> str:
    """The spec's schema for one Responses stream event type (a member of ResponseStreamEvent)."""
    schemas = _document()["components"]["schemas"]
    for member in schemas["ResponseStreamEvent"]["anyOf"]:
        name = member["$ref"].rsplit("/", 1)[1]
        if kind in schemas[name].get("properties", {}).get("type", {}).get("enum", []):
            return name
    raise AssertionError(f"the spec has no stream event of type {kind!r}")


def assert_valid_event(event: dict[str, Any]) -> None:
    """One event of a Responses stream, against its own schema (clearer failures than the union);
    it is then a valid ResponseStreamEvent too."""
    assert_valid(event_schema(event["type"]), event)


def assert_valid_completion_chunk(chunk: dict[str, Any]) -> None:
    """A ``/v1/completions`` stream chunk. The spec has no chunk schema for this route: a chunk is a
    CreateCompletionResponse, whose ``finish_reason`` it types as a string, while OpenAI's own
    streams (and llama-server's) send null until the last chunk. That null is the one exception."""
    fixed = {
        **chunk,
        "choices": [{**c, "finish_reason": c["finish_reason"] or "stop"} for c in chunk["choices"]],
    }
    assert_valid("CreateCompletionResponse", fixed)


def commit() -> str:
    return str(json.loads(SUBSET.read_text())["x-source"]["commit"])
