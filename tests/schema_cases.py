"""Response-format schemas for issue 25, shared by the tests (tests/test_untrusted_schemas.py) and
the adversarial probe (benchmarks/probe/schemas.py): ones a client may send and the server must
refuse with a 400 naming the schema, quickly and without growing, and ones OpenAI documents as
supported in strict mode, which must keep being served."""

from __future__ import annotations

from typing import Any


def _nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def _ref_chain(links: int) -> dict[str, Any]:
    """Each definition uses the next one twice: the converter visits the last one 2^links times."""
    # names the converter stores under another key (reserved: "array" becomes "array-"), so it does
    # not find them and expands them again
    names = ["object", "array", "number", "boolean", "null", "value", "uuid", "date", "time", "dot"]
    defs: dict[str, Any] = {}
    for i in range(links):
        nxt = {"$ref": f"#/$defs/d{i + 1}/{names[(i + 1) % len(names)]}"}
        defs[f"d{i}"] = {names[i % len(names)]: {"type": "array", "prefixItems": [nxt, nxt]}}
    defs[f"d{links}"] = {names[links % len(names)]: {"const": 1}}
    return {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d0/{names[0]}"}}, "$defs": defs}


# (name, schema, the bound its refusal names)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    # finding 1: the grammar allows no token (a NUL byte); llama.cpp aborted the process
    ("pattern only a NUL completes", {"type": "string", "pattern": "^[\\x00]$"}, "pattern"),
    ("pattern of control characters", {"type": "string", "pattern": "^\\x01\\x02$"}, "pattern"),
    # finding 2: nested optional groups past the parser's stack; it segfaulted
    ("maxLength 100,000", {"type": "string", "maxLength": 100_000}, "schema_max_repeat"),
    (
        "maxItems 100,000",
        {"type": "array", "items": {"type": "integer"}, "maxItems": 100_000},
        "schema_max_repeat",
    ),
    # finding 3: the converter wrote the repetition out in full (10 GiB)
    ("pattern a{1000000000}", {"type": "string", "pattern": "^a{1000000000}$"}, "schema_max_repeat"),
    ("pattern a{ 1000000000 }", {"type": "string", "pattern": "^a{ 1000000000 }$"}, "schema_max_repeat"),
    (
        "counts adding up past the grammar",
        {
            "type": "object",
            "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(200)},
            "required": [f"p{i}" for i in range(200)],
        },
        "schema_max_repeat",
    ),
    # finding 4: one sampled token checked against every value (15 s a token)
    ("10,000-value enum", {"enum": [f"value-{i}" for i in range(10_000)]}, "schema_max_enum"),
    (
        "anyOf of 1,000 branches",
        {"anyOf": [{"type": "object", "properties": {f"k{i}": {"type": "integer"}}} for i in range(1000)]},
        "schema_max_branches",
    ),
    (
        "100 optional properties",
        {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(100)}},
        "schema_max_branches",
    ),
    # finding 13: a pattern that is not a regular expression
    ("unbalanced pattern", {"type": "string", "pattern": "^(a|b$"}, "pattern"),
    ("unbalanced bracket", {"type": "string", "pattern": "^[ab$"}, "pattern"),
    # what else a schema can make the converter do
    ("nested 200 deep", _nested(200), "schema_max_depth"),
    ("a $ref to a URL", {"$ref": "https://example.com/schema.json"}, "schema"),
    ("a negative maxLength", {"type": "string", "maxLength": -1}, "schema"),
]

# schemas that used to hang or crash the converter or the sampler and are now served at normal
# speed: (name, schema)
SERVED: list[tuple[str, dict[str, Any]]] = [
    # the converter expanded the last definition 2^40 times, holding the event loop's GIL
    ("a $ref chain once expanding 2^40 times", _ref_chain(40)),
    # finding 4's enum within the bound: written as a prefix tree, 20-50 ms a refused token, not 2 s
    ("a 1,000-value enum", {"enum": [f"value-{i}" for i in range(1000)]}),
]

# strict-mode schemas OpenAI documents (structured outputs), each small enough to finish quickly
SUPPORTED: list[tuple[str, dict[str, Any]]] = [
    (
        "object with enum, boolean and integer",
        {
            "type": "object",
            "properties": {
                "color": {"type": "string", "enum": ["red", "green", "blue"]},
                "ok": {"type": "boolean"},
                "n": {"type": "integer"},
            },
            "required": ["color", "ok", "n"],
            "additionalProperties": False,
        },
    ),
    (
        "pattern and format",
        {
            "type": "object",
            "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{2}$"},
                "when": {"type": "string", "format": "date"},
            },
            "required": ["code", "when"],
            "additionalProperties": False,
        },
    ),
    (
        "anyOf with null, and a small array",
        {
            "type": "object",
            "properties": {
                "name": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
                "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
            },
            "required": ["name", "tags"],
            "additionalProperties": False,
        },
    ),
    (
        "$defs and a recursive $ref",
        {
            "type": "object",
            "properties": {"root": {"$ref": "#/$defs/a_node_with_a_rather_long_definition_name_here"}},
            "required": ["root"],
            "additionalProperties": False,
            "$defs": {
                "a_node_with_a_rather_long_definition_name_here": {
                    "type": "object",
                    "properties": {
                        "v": {"type": "integer"},
                        "next": {
                            "anyOf": [
                                {"$ref": "#/$defs/a_node_with_a_rather_long_definition_name_here"},
                                {"type": "null"},
                            ]
                        },
                    },
                    "required": ["v", "next"],
                    "additionalProperties": False,
                }
            },
        },
    ),
    ("a const holding quotes", {"const": 'say "hi" \\ bye'}),
]
