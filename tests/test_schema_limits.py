"""The schema bounds of issue 25 as pure functions (kvproxy.schema_limits), the bounded converter
(kvproxy.backends.grammar) and the grammar compiler's child process, without a model. The server's
side, with the real model, is tests/test_untrusted_schemas.py."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from kvproxy.backends.grammar import json_gbnf, prefix_tree, short_name
from kvproxy.backends.grammar_compiler import GrammarCompiler
from kvproxy.schema_limits import SchemaLimits, SchemaRefused, check_pattern, check_schema, pattern_counts
from tests.schema_cases import REFUSED, SUPPORTED, _ref_chain

LIMITS = SchemaLimits()


def parses(grammar: str) -> bool:
    """llama.cpp's own parser on the grammar (no vocabulary: JSON grammars name no tokens)."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(None, grammar.encode(), b"root")
    if sampler:
        llama_cpp.llama_sampler_free(sampler)
    return bool(sampler)


def refusal(schema: Any, limits: SchemaLimits = LIMITS) -> SchemaRefused:
    with pytest.raises(SchemaRefused) as caught:
        json_gbnf(schema, limits)
    return caught.value


@pytest.mark.parametrize(("name", "schema", "bound"), REFUSED, ids=[c[0] for c in REFUSED])
def test_each_adversarial_schema_is_refused_at_once_naming_its_bound(
    name: str, schema: dict[str, Any], bound: str
) -> None:
    start = time.perf_counter()
    refused = refusal(schema)
    took = time.perf_counter() - start
    assert refused.bound == bound, str(refused)
    assert f"({bound})" in str(refused)
    assert took < 0.1, f"{name}: refused in {took:.3f} s"


@pytest.mark.parametrize(("name", "schema"), SUPPORTED, ids=[c[0] for c in SUPPORTED])
def test_what_openai_supports_in_strict_mode_converts_and_parses(name: str, schema: dict[str, Any]) -> None:
    assert parses(json_gbnf(schema)), name


@pytest.mark.parametrize(
    ("pattern", "ok"),
    [
        ("^[\\x00]$", False),  # finding 1
        ("^\\x00?a$", True),  # optional: "a" is enough
        ("^(\\x00|b)$", True),  # one branch is enough
        ("^[^\\x00-\\U0010FFFF]$", False),  # leaves nothing out... of everything
        ("^[^\\s\\S]$", False),
        ("^[^\\x00-\\x1f]$", True),
        ("^[\\x7f]$", False),  # DEL: llama.cpp's JSON strings exclude it too
        ("^[\\ud800]$", False),  # a lone surrogate: no token decodes to one
        ("^[a-z]+@[a-z]+\\.com$", True),
        ("^(a|b$", False),  # finding 13: not a regular expression
        ("^[ab$", False),
        ("^a{2,1}$", False),
    ],
)
def test_a_pattern_must_compile_and_match_some_json_text(pattern: str, ok: bool) -> None:
    if ok:
        check_pattern(pattern, LIMITS)
    else:
        with pytest.raises(SchemaRefused) as caught:
            check_pattern(pattern, LIMITS)
        assert caught.value.bound == "pattern"


def test_repetition_counts_are_read_as_the_converter_reads_them() -> None:
    """``{ 5 }`` and ``{1_000}`` are counts to llama-cpp-python's converter (int() of each part),
    though text to Python's re; escaped braces and braces in brackets are not counts."""
    assert list(pattern_counts("^a{3}b{2,5}c{4,}d{,6}$", 64)) == [3, 2, 5, 4, 6]
    assert list(pattern_counts("^a{ 7 }b{1_000}$", 64)) == [7, 1000]
    assert list(pattern_counts("^\\{9999}[{]{2}$", 64)) == [2]
    assert (
        list(pattern_counts("^a{" + "9" * 5000 + "}$", 64)) == []
    )  # int() refuses it: so does the converter
    with pytest.raises(SchemaRefused, match="schema_max_depth"):
        list(pattern_counts("(" * 65 + ")" * 65, 64))
    assert check_pattern("^a{1000}$", LIMITS) == 1000
    with pytest.raises(SchemaRefused, match="schema_max_repeat"):
        check_pattern("^(ab){1001}$", LIMITS)


def test_each_bound_is_a_setting_that_moves_the_line() -> None:
    """Every bound refuses just past its value and serves at it."""
    small = SchemaLimits(
        max_bytes=4096, max_depth=8, max_enum=3, max_branches=2, max_repeat=5, max_grammar_bytes=4096
    )
    string, union = {"type": "string"}, {"anyOf": [{"type": "string"}, {"type": "null"}]}
    ok_and_over: list[tuple[dict[str, Any], dict[str, Any], str]] = [
        ({**string, "maxLength": 5}, {**string, "maxLength": 6}, "schema_max_repeat"),
        ({**string, "pattern": "^a{5}$"}, {**string, "pattern": "^a{6}$"}, "schema_max_repeat"),
        ({"enum": [1, 2, 3]}, {"enum": [1, 2, 3, 4]}, "schema_max_enum"),
        (
            {"type": "object", "properties": {"a": {"const": 1}, "b": {"enum": [1, 2]}}},
            {"type": "object", "properties": {"a": {"const": 1}, "b": {"enum": [1, 2, 3]}}},
            "schema_max_enum",
        ),
        (union, {"type": ["string", "null", "integer"]}, "schema_max_branches"),
        (_deep_arrays(2), _deep_arrays(9), "schema_max_depth"),
        ({"enum": ["x" * 100]}, {"enum": ["x" * 4100]}, "schema_max_bytes"),
    ]
    for ok, over, bound in ok_and_over:
        assert parses(json_gbnf(ok, small)), ok
        assert refusal(over, small).bound == bound, over
    # the grammar's own size: 60 properties of 60-character names fit 4 KiB as a schema, not as a grammar
    wide = {"type": "object", "properties": {f"{i:060d}": {"type": "integer"} for i in range(60)}}
    assert refusal(wide, SchemaLimits(max_grammar_bytes=4096)).bound == "grammar_max_bytes"
    # the counts of a schema together: past max_grammar_bytes / 8
    many = {
        "type": "object",
        "properties": {f"p{i}": {"type": "string", "maxLength": 1000} for i in range(9)},
    }
    assert refusal(many, SchemaLimits(max_grammar_bytes=64 * 1024)).bound == "schema_max_repeat"


def _deep_arrays(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


def test_only_references_into_the_schema_are_followed() -> None:
    for ref in ("https://example.com/s.json", "http://169.254.169.254/", "#", "other.json#/a", 5):
        with pytest.raises(SchemaRefused, match="point into the schema"):
            check_schema({"type": "object", "properties": {"a": {"$ref": ref}}}, LIMITS)


def test_enums_become_a_prefix_tree_that_spells_exactly_the_values() -> None:
    values = ["a", "ab", "abc", "abd", "b", 'q"uote', "back\\slash", "x" * 300]
    nodes = prefix_tree(values)

    def spelled(index: int) -> set[str]:
        node = nodes[index]
        out = {""} if node.ends else set()
        for text, child in node.edges:
            out |= {text} if child is None else {text + rest for rest in spelled(child)}
        return out

    assert spelled(0) == set(values)
    assert all(i < j for i, n in enumerate(nodes) for _, j in n.edges if j is not None)  # children after
    grammar = json_gbnf({"enum": [*values, 1, None, {"k": [True]}]})
    assert parses(grammar)
    # a chain of values each a prefix of the next is built without recursion
    assert len(prefix_tree(["a" * i for i in range(1, 3000)])) == 2999  # the root, then one a value


def test_a_reference_chain_is_expanded_once_not_two_to_the_n_times() -> None:
    """Each definition used twice by the one before: llama-cpp-python's converter visited the last
    2^n times (16 links: 0.5 s, 40: forever); here each is visited once."""
    start = time.perf_counter()
    grammar = json_gbnf(_ref_chain(40))
    assert time.perf_counter() - start < 0.1
    assert parses(grammar)


def test_long_names_are_cut_and_still_unique() -> None:
    long_a, long_b = "a" * 100 + "x", "a" * 100 + "y"
    assert len(short_name(long_a)) <= 40 and short_name(long_a) != short_name(long_b)
    assert short_name(short_name(long_a)) == short_name(long_a) and short_name("abc") == "abc"
    schema = {
        "type": "object",
        "properties": {long_a: {"type": "array", "items": {"type": "string"}, "maxItems": 50}},
    }
    grammar = json_gbnf(schema)
    assert parses(grammar) and max(len(line.split(" ::= ")[0]) for line in grammar.splitlines()) <= 48


def test_the_compiler_child_contains_what_the_checks_let_through() -> None:
    """A grammar llama.cpp cannot parse is refused with llama.cpp's reason, not its stderr dump of
    the grammar; a child that dies (here: killed mid-compile) refuses that schema only, and the
    next schema gets a fresh child."""
    compiler = GrammarCompiler(LIMITS)
    compiler.start()

    async def run() -> None:
        ok = SUPPORTED[0][1]
        assert "root ::=" in await compiler.compile(ok)
        # \d is a regular expression llama-cpp-python's converter copies into GBNF, which has no \d
        with pytest.raises(SchemaRefused) as caught:
            await compiler.compile({"type": "string", "pattern": "^\\d+$"})
        assert caught.value.bound == "llama.cpp" and "unknown escape" in str(caught.value)
        assert len(caught.value.detail) <= 300
        pid = compiler._proc.pid if compiler._proc else 0
        import os
        import signal

        os.kill(pid, signal.SIGSEGV)
        await asyncio.sleep(0.2)
        assert "root ::=" in await compiler.compile(ok)  # it had died between schemas: started again
        assert compiler._proc is not None and compiler._proc.pid != pid

    try:
        asyncio.run(run())
    finally:
        compiler.close()


def test_the_child_caps_its_memory_should_the_bounds_be_lifted() -> None:
    """With the repetition bound lifted (a misconfiguration), ``a{1000000000}`` meets the child's
    memory cap (a MemoryError: a 400) instead of taking 10 GiB, and the child serves on."""
    compiler = GrammarCompiler(SchemaLimits(max_repeat=10**9))
    compiler.start()

    async def run() -> None:
        with pytest.raises(SchemaRefused, match="MemoryError"):
            await compiler.compile({"type": "string", "pattern": "^a{1000000000}$"})
        assert "root ::=" in await compiler.compile({"type": "string"})

    try:
        asyncio.run(run())
    finally:
        compiler.close()


def test_the_schema_size_is_checked_before_anything_is_sent() -> None:
    compiler = GrammarCompiler(SchemaLimits(max_bytes=1024))

    async def run() -> None:
        with pytest.raises(SchemaRefused, match="schema_max_bytes"):
            await compiler.compile({"enum": ["x" * 2000]})

    try:
        asyncio.run(run())
        assert compiler._proc is None  # no child was needed to say no
    finally:
        compiler.close()


def test_limits_travel_to_the_child_as_json() -> None:
    assert SchemaLimits(**json.loads(json.dumps(LIMITS.__dict__))) == LIMITS
