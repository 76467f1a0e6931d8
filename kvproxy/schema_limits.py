"""Bounds on a JSON schema, checked before llama.cpp builds a grammar from it (issue 25).

A request's ``response_format`` schema is untrusted input (docs/design.md, "Untrusted input"), and
what llama.cpp builds from it grows with what it asks for, past the point where it takes the process
down: llama-cpp-python's converter writes ``a{1000000000}`` out in full (10 GiB), llama.cpp parses a
``maxLength`` of 100,000 as 100,000 nested groups on a thread's stack (a segfault), a pattern no token
can follow makes its sampler throw through ctypes (an abort), and every enum value or ``anyOf`` branch
open at one position costs about 1.6 ms a sampled token (a 10,000-value enum: 15 s a token).

So a schema is measured first, by the pure functions here, and one past a bound is refused with the
setting that bounds it and the place in the schema (a JSON pointer) where it was passed:

- its JSON nesting depth (objects and arrays in one another; a property's schema is two levels below
  its object), and the nesting of groups in its patterns;
- its enum and const values, all together (OpenAI allows 1,000);
- the branches of any one ``anyOf``, ``oneOf`` or list of types;
- every repetition count: ``minLength``, ``maxLength``, ``minItems``, ``maxItems`` and ``{n}``,
  ``{n,}``, ``{n,m}`` in a pattern, each alone and all of them together (each repetition writes its
  item once more into the grammar);
- patterns must compile as regular expressions and must match some text a JSON string holds
  unescaped (a pattern that needs a control character leaves the sampler no token to pick);
- a ``$ref`` must point into the schema itself (``#/...``): nothing is fetched.

The schema's size and the grammar's are bounded where they are known (kvproxy.backends.grammar).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

# Python's own regular-expression parser (re._parser, sre_parse before 3.11): no stubs, so Any
_sre: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

# the fewest grammar bytes one repetition writes (``(char `` and ``)?``): the counts of a schema
# together may ask for max_grammar_bytes / this; past that the grammar could not fit anyway. (The
# most one writes is about 64, a rule name of at most 48 characters and a separator, so what the
# converter builds before its own byte count stops it stays under 8 times the grammar bound.)
REPEAT_BYTES = 8

COUNT_KEYWORDS = ("minLength", "maxLength", "minItems", "maxItems")
UNION_KEYWORDS = ("anyOf", "oneOf")
# keywords whose value is one subschema, a list of them, or a map of names to them
SUBSCHEMA = frozenset(
    {
        "items",
        "additionalProperties",
        "not",
        "if",
        "then",
        "else",
        "contains",
        "propertyNames",
        "additionalItems",
        "unevaluatedItems",
        "unevaluatedProperties",
    }
)
SUBSCHEMA_LISTS = frozenset({"anyOf", "oneOf", "allOf", "prefixItems", "items"})
SUBSCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})
# keywords whose values never reach the grammar: measured for depth only
ANNOTATIONS = frozenset({"description", "title", "$comment", "examples", "default", "deprecated"})


@dataclass(frozen=True)
class SchemaLimits:
    """The bounds (kvproxy.config.Settings names each ``schema_<field>``, but ``grammar_max_bytes``)."""

    max_bytes: int = 512 * 1024  # the schema as compact JSON
    max_depth: int = 64  # JSON nesting of the schema, and group nesting in a pattern
    max_enum: int = 1_000  # enum and const values, all together
    max_branches: int = 64  # branches of one anyOf / oneOf / list of types
    max_repeat: int = 1_000  # one repetition count
    max_grammar_bytes: int = 1024 * 1024  # the grammar llama.cpp parses

    @property
    def max_repeat_total(self) -> int:
        """All the repetition counts of one schema together."""
        return max(self.max_repeat, self.max_grammar_bytes // REPEAT_BYTES)


class SchemaRefused(ValueError):
    """A schema kvproxy will not build a grammar for. ``bound`` names the setting (or the rule) it
    passed, without request content, for the log; ``str()`` is the message for the client."""

    def __init__(self, bound: str, message: str, path: str = "") -> None:
        where = f" at {_shorten(path)}" if path else ""
        super().__init__(f"{message}{where} ({bound})")
        self.bound = bound
        self.detail = ""  # what llama.cpp said, for the debug log only

    @classmethod
    def restored(cls, bound: str, text: str, detail: str = "") -> SchemaRefused:
        """A refusal as the grammar compiler's child process sent it (its text already written)."""
        refused = cls(bound, "")
        refused.args = (text,)
        refused.detail = detail
        return refused


def _shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _pointer(path: str, key: str | int) -> str:
    """A JSON pointer one step further (RFC 6901 escapes)."""
    return f"{path}/{str(key).replace('~', '~0').replace('/', '~1')}"


def check_schema(schema: Any, limits: SchemaLimits) -> None:
    """Refuse (:class:`SchemaRefused`) a schema past one of ``limits``; return None otherwise."""
    measure = _Measure(limits)
    measure.schema(schema, "", 1)


class _Measure:
    """One walk over a schema, counting what the bounds are about."""

    def __init__(self, limits: SchemaLimits) -> None:
        self.limits = limits
        self.enum = 0
        self.repeats = 0

    def depth(self, depth: int, path: str) -> None:
        if depth > self.limits.max_depth:
            raise SchemaRefused(
                "schema_max_depth", f"The schema nests deeper than {self.limits.max_depth} levels", path
            )

    def value(self, value: Any, path: str, depth: int) -> None:
        """Any JSON value that is not a subschema: only its depth matters."""
        self.depth(depth, path)
        if isinstance(value, dict):
            for key, item in value.items():
                if isinstance(item, dict | list):
                    self.value(item, _pointer(path, key), depth + 1)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                if isinstance(item, dict | list):
                    self.value(item, _pointer(path, i), depth + 1)

    def schema(self, schema: Any, path: str, depth: int) -> None:
        self.depth(depth, path)
        if not isinstance(schema, dict):  # true, false, or not a schema: the converter says so
            self.value(schema, path, depth)
            return
        for key, item in schema.items():
            here = _pointer(path, key)
            if key in ANNOTATIONS:
                self.value(item, here, depth + 1)
            elif key in SUBSCHEMA_LISTS and isinstance(item, list):
                self.depth(depth + 1, here)
                if key in UNION_KEYWORDS:
                    check_branches(len(item), self.limits, here)
                for i, sub in enumerate(item):
                    self.schema(sub, _pointer(here, i), depth + 2)
            elif key in SUBSCHEMA_MAPS and isinstance(item, dict):
                self.depth(depth + 1, here)
                if key == "properties":
                    check_optional(schema, item, self.limits, here)
                for name, sub in item.items():
                    self.schema(sub, _pointer(here, name), depth + 2)
            elif key in SUBSCHEMA:
                self.schema(item, here, depth + 1)
            else:
                self.keyword(key, item, here, depth)

    def keyword(self, key: str, item: Any, path: str, depth: int) -> None:
        """The keywords a bound is about; any other value is measured for depth only."""
        if key in COUNT_KEYWORDS:
            self.count(check_count(item, self.limits, path), path)
        elif key == "pattern" and isinstance(item, str):
            self.count(check_pattern(item, self.limits, path), path)
        elif key == "$ref":
            check_ref(item, path)
        elif key == "enum" and isinstance(item, list):
            self.values(len(item), path)
        elif key == "const":
            self.values(1, path)
        elif key == "type" and isinstance(item, list):
            check_branches(len(item), self.limits, path)
        self.value(item, path, depth + 1)

    def values(self, n: int, path: str) -> None:
        self.enum += n
        if self.enum > self.limits.max_enum:
            raise SchemaRefused(
                "schema_max_enum",
                f"The schema's enum and const values number more than {self.limits.max_enum} together",
                path,
            )

    def count(self, n: int, path: str) -> None:
        self.repeats += n
        total = self.limits.max_repeat_total
        if self.repeats > total:
            raise SchemaRefused(
                "schema_max_repeat",
                f"The schema's repetition counts (minLength, maxLength, minItems, maxItems and "
                f"{{n,m}} in patterns) add up to more than {total}",
                path,
            )


def check_branches(n: int, limits: SchemaLimits, path: str, what: str = "A choice of {n} branches") -> None:
    """One choice among ``n`` branches: every branch open at one position costs each sampled token."""
    if n > limits.max_branches:
        raise SchemaRefused(
            "schema_max_branches", f"{what.format(n=n)} is more than {limits.max_branches}", path
        )


def check_optional(
    schema: dict[str, Any], properties: dict[str, Any], limits: SchemaLimits, path: str
) -> None:
    """The optional properties of an object are a choice at every position (which comes next), and
    the converter writes them out in time quadratic in their number (300: 0.2 s; OpenAI's strict
    mode has none: every property is required)."""
    required = schema.get("required")
    named = set(required) & properties.keys() if isinstance(required, list) else set()
    extra = schema.get("additionalProperties") not in (None, False)
    optional = len(properties) - len(named) + extra
    check_branches(optional, limits, path, "An object with {n} optional properties")


def check_count(value: Any, limits: SchemaLimits, path: str) -> int:
    """A ``minLength``/``maxLength``/``minItems``/``maxItems``: a whole number up to ``max_repeat``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise SchemaRefused("schema", "A length or item count must be a non-negative integer", path)
    if value > limits.max_repeat:
        raise SchemaRefused("schema_max_repeat", f"The count {value} is more than {limits.max_repeat}", path)
    return value


def check_ref(value: Any, path: str) -> None:
    """Only references into the schema itself: a URL would be fetched by the converter."""
    if not isinstance(value, str) or not value.startswith("#/"):
        raise SchemaRefused("schema", "A $ref must point into the schema itself (#/...)", path)


def check_pattern(pattern: str, limits: SchemaLimits, path: str = "") -> int:
    """Refuse a pattern that is not a regular expression, nests its groups past ``max_depth``,
    repeats past ``max_repeat``, or matches no text a JSON string holds unescaped; return the sum of
    its repetition counts (for the schema's total)."""
    counts = list(pattern_counts(pattern, limits.max_depth, path))
    for n in counts:
        if n > limits.max_repeat:
            raise SchemaRefused(
                "schema_max_repeat", f"The pattern repeats {n} times, more than {limits.max_repeat}", path
            )
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        reason = exc.msg if isinstance(exc, re.error) else type(exc).__name__
        raise SchemaRefused(
            "pattern", f"The pattern is not a valid regular expression: {reason}", path
        ) from None
    for n in _parsed_counts(parsed):
        if n > limits.max_repeat:
            raise SchemaRefused(
                "schema_max_repeat", f"The pattern repeats {n} times, more than {limits.max_repeat}", path
            )
    if not _can_match(parsed):
        raise SchemaRefused(
            "pattern",
            "The pattern matches no text a JSON string can hold unescaped (it needs a control "
            "character or a lone surrogate), so no token could follow it",
            path,
        )
    return sum(counts)


def pattern_counts(pattern: str, max_depth: int, path: str = "") -> Iterator[int]:
    """The repetition counts in a pattern as llama-cpp-python's converter reads them: ``{...}``
    outside brackets and escapes, split at commas, each part stripped and read by ``int()`` (so
    ``{ 5 }`` and ``{1_000}`` count though Python's ``re`` reads them as text). A part ``int()``
    refuses is the converter's error, not a count. Groups nested past ``max_depth`` are refused."""
    i, n, depth = 0, len(pattern), 0
    while i < n:
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":  # to the closing bracket, escapes skipped, as the converter reads it
            i += 1
            while i < n and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                return
            yield from _ints(pattern[i + 1 : end])
            i = end + 1
        else:
            depth += c == "("
            depth -= c == ")"
            if depth > max_depth:
                raise SchemaRefused(
                    "schema_max_depth", f"The pattern nests groups deeper than {max_depth}", path
                )
            i += 1


def _ints(text: str) -> Iterator[int]:
    for part in text.split(","):
        try:
            yield int(part.strip())
        except ValueError:  # empty, not a number, or past int()'s 4,300 digits
            continue


def _parsed_counts(items: Any) -> Iterator[int]:
    """The bounded repetition counts Python's parser found (``{n,}``: n; ``*``, ``+``: none)."""
    for op, av in items:
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            lo, hi, sub = av
            yield lo if hi == _c.MAXREPEAT else hi
            yield from _parsed_counts(sub)
        elif op is _c.SUBPATTERN:
            yield from _parsed_counts(av[-1])
        elif op is _c.ATOMIC_GROUP:
            yield from _parsed_counts(av)
        elif op is _c.BRANCH:
            for branch in av[1]:
                yield from _parsed_counts(branch)


# the characters a JSON string holds unescaped and a token can produce: no C0 control character, no
# DEL (llama.cpp's JSON strings exclude it too), no lone surrogate; as (first, last) ranges
JSON_TEXT = ((0x20, 0x7E), (0x80, 0xD7FF), (0xE000, 0x10FFFF))


def json_text_char(code: int) -> bool:
    return any(lo <= code <= hi for lo, hi in JSON_TEXT)


def _can_match(items: Any) -> bool:
    """Whether a parsed pattern matches some string of JSON text characters (a sequence does when
    every item does; a zero-width item, a back-reference or an optional repetition always does)."""
    for op, av in items:
        if op is _c.LITERAL:
            ok = json_text_char(av)
        elif op is _c.IN:
            ok = _set_can_match(av)
        elif op is _c.BRANCH:
            ok = any(_can_match(branch) for branch in av[1])
        elif op is _c.SUBPATTERN:
            ok = _can_match(av[-1])
        elif op is _c.ATOMIC_GROUP:
            ok = _can_match(av)
        elif op in (_c.MAX_REPEAT, _c.MIN_REPEAT, _c.POSSESSIVE_REPEAT):
            ok = av[0] == 0 or _can_match(av[2])
        else:  # ANY, NOT_LITERAL, AT, ASSERT, GROUPREF...
            ok = True
        if not ok:
            return False
    return True


_COMPLEMENTS = ({"CATEGORY_DIGIT", "CATEGORY_NOT_DIGIT"}, {"CATEGORY_SPACE", "CATEGORY_NOT_SPACE"},
                {"CATEGORY_WORD", "CATEGORY_NOT_WORD"})  # fmt: skip


def _set_can_match(members: Any) -> bool:
    """A character class: ``[...]`` holds a JSON text character, or ``[^...]`` leaves one out."""
    negate = bool(members) and members[0][0] is _c.NEGATE
    ranges: list[tuple[int, int]] = []
    categories: set[str] = set()
    for op, av in members:
        if op is _c.LITERAL:
            ranges.append((av, av))
        elif op is _c.RANGE:
            ranges.append(av)
        elif op is _c.CATEGORY:
            categories.add(av.name)
        elif op is not _c.NEGATE:  # a case-folded member ((?i), which the converter refuses)
            return True
    if not negate:  # every category (\d, \s, \w and their opposites) holds a printable character
        return bool(categories) or any(_overlaps_json_text(lo, hi) for lo, hi in ranges)
    if any(pair <= categories for pair in _COMPLEMENTS):  # [^\d\D]: nothing at all
        return False
    return bool(categories) or not _covers_json_text(ranges)


def _overlaps_json_text(lo: int, hi: int) -> bool:
    return any(max(lo, a) <= min(hi, b) for a, b in JSON_TEXT)


def _covers_json_text(ranges: list[tuple[int, int]]) -> bool:
    """Whether the ranges together take in every JSON text character."""
    for a, b in JSON_TEXT:
        reach = a
        for lo, hi in sorted(ranges):
            if lo <= reach <= hi:
                reach = hi + 1
        if reach <= b:
            return False
    return True
