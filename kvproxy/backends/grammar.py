"""JSON schemas into llama.cpp grammars (GBNF), within bounds (issue 25).

llama-cpp-python's converter (a port of llama.cpp's examples/json-schema-to-grammar.py) does the
work; kvproxy measures the schema first (kvproxy.schema_limits) and runs the converter as a subclass
that counts as it goes, because what it builds is not proportional to what it reads: a ``$ref`` is
expanded again wherever its name is taken (a 50-byte chain of references can ask for 2^30 visits),
and rule names grow with every property name on their path, each repetition writing one out again.
The subclass refuses past ``schema_max_bytes / 16`` visits and past ``grammar_max_bytes`` of rules,
keeps rule names under 48 characters, and writes enum and const values as a prefix tree: llama.cpp
keeps one parse stack per open alternative and tests every vocabulary token against each, so an enum
written as a flat list of 1,000 literals cost 1.6 s a sampled token, and as a tree it costs as many
stacks as the values have different next characters.

Importing this module loads llama.cpp (llama_cpp); the server runs it in a child process
(kvproxy.backends.grammar_child), never on its own threads.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from llama_cpp.llama_grammar import INVALID_RULE_CHARS_RE, JSON_GBNF, RESERVED_NAMES, SchemaConverter

from kvproxy.schema_limits import SchemaLimits, SchemaRefused, check_schema

# llama-cpp-python's port of llama.cpp's schema converter lets a string hold raw control characters
# (a newline, say), which is not JSON; llama.cpp's own converter (common/json-schema-to-grammar.cpp)
# excludes them, as its JSON grammar (json_object) does
_LOOSE_CHAR = r'char ::= [^"\\] |'
_JSON_CHAR = r'char ::= [^"\\\x7F\x00-\x1F] |'

NAME_LIMIT = 40  # longer rule names are cut and given a hash (short_name)
VISIT_BYTES = 16  # the converter may visit one subschema per this many bytes of schema_max_bytes


def json_gbnf(schema: dict[str, Any] | None, limits: SchemaLimits | None = None) -> str:
    """The llama.cpp grammar for JSON output: any JSON object (``schema`` None, OpenAI's
    ``json_object``: llama.cpp's JSON grammar), else values matching ``schema``. A schema past
    ``limits``, or one the converter cannot take, is a :class:`SchemaRefused` (a ValueError)."""
    if schema is None:
        return str(JSON_GBNF)
    limits = limits or SchemaLimits()
    text = json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
    check_schema_size(len(text.encode("utf-8", errors="surrogatepass")), limits)
    check_schema(schema, limits)
    converter = BoundedConverter(limits)
    try:
        copy = json.loads(text)  # resolve_refs rewrites the $refs it meets
        converter.visit(converter.resolve_refs(copy, "stdin"), "")
        grammar = converter.format_grammar()  # type: ignore[no-untyped-call]
    except SchemaRefused:
        raise
    except Exception as exc:  # the converter raises whatever it meets (KeyError, AssertionError...)
        reason = f"{type(exc).__name__}: {exc}"
        reason = reason if len(reason) <= 200 else reason[:197] + "..."
        raise SchemaRefused("schema", f"The schema cannot be turned into a grammar: {reason}") from None
    grammar = "\n".join(
        _JSON_CHAR + line[len(_LOOSE_CHAR) :] if line.startswith(_LOOSE_CHAR) else line
        for line in grammar.split("\n")
    )
    check_grammar_size(len(grammar.encode()), limits)
    return grammar


def check_schema_size(n_bytes: int, limits: SchemaLimits) -> None:
    if n_bytes > limits.max_bytes:
        raise SchemaRefused(
            "schema_max_bytes", f"The schema is {n_bytes} bytes as JSON, more than {limits.max_bytes}"
        )


def check_grammar_size(n_bytes: int, limits: SchemaLimits) -> None:
    if n_bytes > limits.max_grammar_bytes:
        raise SchemaRefused(
            "grammar_max_bytes",
            f"The schema's grammar would be more than {limits.max_grammar_bytes} bytes",
        )


def short_name(name: str) -> str:
    """A rule name of at most NAME_LIMIT characters: a long one keeps its start and gets a hash of
    the whole (the same name always gives the same short one, so the converter's reuse still works)."""
    if len(name) <= NAME_LIMIT:
        return name
    return f"{name[:24]}-{hashlib.blake2b(name.encode(), digest_size=6).hexdigest()}"


def gbnf_literal(text: str) -> str:
    """A GBNF string literal (llama-cpp-python's own leaves backslashes unescaped, which breaks on
    a value holding a quote)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


@dataclass(frozen=True)
class TrieNode:
    """One branching point of a prefix tree: ``ends`` when a value ends here; each edge is the text
    up to the next branching point and that point's index, or None where a value ends."""

    ends: bool
    edges: tuple[tuple[str, int | None], ...]


def prefix_tree(values: list[str]) -> list[TrieNode]:
    """The values as a prefix tree with one node per branching point, the root first; a node's
    children come after it (built without recursion: values may share very long prefixes)."""
    words = sorted(set(values))
    if not words:
        raise SchemaRefused("schema", "An enum needs at least one value")
    nodes: list[TrieNode | None] = [None]
    todo: list[tuple[int, list[str], int]] = [(0, words, 0)]
    while todo:
        index, group, depth = todo.pop()
        ends = len(group[0]) == depth  # sorted: a value that ends here comes first
        edges: list[tuple[str, int | None]] = []
        i = 1 if ends else 0
        while i < len(group):
            j = i
            while j < len(group) and group[j][depth] == group[i][depth]:
                j += 1
            branch = group[i:j]
            if len(branch) == 1:
                edges.append((branch[0][depth:], None))
            else:
                shared = _common_prefix(branch[0], branch[-1])  # sorted: the first and last share what all do
                nodes.append(None)
                todo.append((len(nodes) - 1, branch, shared))
                edges.append((branch[0][depth:shared], len(nodes) - 1))
            i = j
        nodes[index] = TrieNode(ends, tuple(edges))
    return [n for n in nodes if n is not None]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class BoundedConverter(SchemaConverter):
    """llama-cpp-python's converter, counting its visits and the grammar it writes (see the module)."""

    def __init__(self, limits: SchemaLimits) -> None:
        super().__init__(  # type: ignore[no-untyped-call]
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        self._limits = limits
        self._visits = 0
        self._bytes = 0
        self._resolved: dict[str, str] = {}  # $ref: the key of its rule

    def visit(self, schema: Any, name: str) -> str:
        self._visits += 1
        if self._visits > self._limits.max_bytes // VISIT_BYTES:
            raise SchemaRefused(
                "schema_max_bytes",
                f"The schema expands to more than {self._limits.max_bytes // VISIT_BYTES} subschemas "
                "(each $ref is expanded where it is used)",
            )
        name = short_name(name)
        values = _literal_values(schema)
        if values is not None:
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return self._literal_rule(values, rule_name)
        return str(super().visit(schema, name))  # type: ignore[no-untyped-call]

    def _literal_rule(self, values: list[Any], rule_name: str) -> str:
        """An enum or const as a prefix tree of its JSON texts, one rule per branching point."""
        nodes = prefix_tree([json.dumps(v) for v in values])
        keys: dict[int, str] = {}
        for index in range(len(nodes) - 1, 0, -1):  # children first: their keys go into the parent
            keys[index] = self._add_rule(f"{rule_name}-{index}", _node_body(nodes[index], keys))
        return str(self._add_rule(rule_name, _node_body(nodes[0], keys)))

    def _add_rule(self, name: str, rule: str) -> str:
        before = len(self._rules)
        key = str(super()._add_rule(short_name(name), rule))  # type: ignore[no-untyped-call]
        if len(self._rules) > before:
            self._bytes += len(key) + len(rule) + 6
            if self._bytes > self._limits.max_grammar_bytes:
                check_grammar_size(self._bytes, self._limits)
        return key

    def _resolve_ref(self, ref: str) -> str:
        # llama-cpp-python's, with two changes. The rule name is made valid and short as visit()
        # makes it (else a recursive reference names a rule written under another name). And a
        # reference once resolved is not expanded again: llama-cpp-python looks for its rule under
        # the definition's name, which is not the rule's key when that name is reserved ("array"
        # is written as "array-"), so a chain of such definitions each used twice was expanded
        # 2^n times (16 links: 0.5 s; 40: forever)
        if ref in self._resolved:
            return self._resolved[ref]
        ref_name = short_name(INVALID_RULE_CHARS_RE.sub("-", ref.split("/")[-1]))
        if ref_name not in self._rules and ref not in self._refs_being_resolved:
            self._refs_being_resolved.add(ref)
            ref_name = self.visit(self._refs[ref], ref_name)
            self._refs_being_resolved.remove(ref)
            self._resolved[ref] = ref_name
        return ref_name


def _literal_values(schema: Any) -> list[Any] | None:
    """The values of a schema the converter would write as literals (const, or enum), taken where
    its own visit() would take them: after $ref, anyOf/oneOf and a list of types."""
    if not isinstance(schema, dict) or "$ref" in schema or "oneOf" in schema or "anyOf" in schema:
        return None
    if isinstance(schema.get("type"), list):
        return None
    if "const" in schema:
        return [schema["const"]]
    enum = schema.get("enum")
    return enum if isinstance(enum, list) else None


def _node_body(node: TrieNode, keys: dict[int, str]) -> str:
    alternatives = " | ".join(
        gbnf_literal(text) + (f" {keys[child]}" if child is not None else "") for text, child in node.edges
    )
    return f"({alternatives})?" if node.ends else alternatives
