"""Qwen3.5/3.6's and Qwen3-Coder's XML-parameter tool-call format (llama.cpp's "Qwen3-Coder" parser,
common/parsers/qwen3-coder.cpp, also Nemotron Nano 3 and StepFun-3.5-Flash).

The template describes the tools and writes earlier calls and results itself. The model writes::

    <tool_call>
    <function=NAME>
    <parameter=ARG>
    VALUE
    </parameter>
    </function>
    </tool_call>

A value is text, typed per the function's schema as llama.cpp types it: a parameter that cannot be
a string is JSON; one that can only be a string is the text as it stands; one that may be either is
JSON where it parses as one of its other types, else the text. A call names a function offered,
only its parameters, and all the required ones (else llama.cpp's parser does not match it and the
whole answer is content). A required or named choice is forced by a grammar built as llama.cpp
builds it: required parameters in any order (up to 6), then optional ones; a value that cannot be
a string follows its schema's JSON grammar (compiled in the grammar child, under the schema limits).
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvproxy.tool_calls import gbnf
from kvproxy.tool_calls.spec import ParsedCall, ToolPlan, compact_json, parameters

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
ARG_CLOSE = "\n</parameter>\n"
MAX_PERMUTE = 6  # llama.cpp's COMMON_CHAT_MAX_PERMUTE: more required parameters go in schema order
ALL_TYPES = frozenset({"string", "object", "array", "number", "integer", "boolean", "null"})
_CALL = re.compile(r"<tool_call>\n<function=([^>\n]*)>\n")
_ARG = re.compile(r"<parameter=([^>\n]*)>\n")
_VALUE_KEY = "kvparg"  # the property names that carry each parameter's schema into one compile


def value_types(schema: Any) -> frozenset[str]:
    """The JSON types a parameter's schema allows (llama.cpp's ``value_types``); any when unsaid."""
    if not isinstance(schema, dict):
        return ALL_TYPES
    t = schema.get("type")
    if isinstance(t, str):
        return frozenset({t})
    if isinstance(t, list):
        return frozenset(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list):
            return frozenset().union(*(value_types(s) for s in schema[key]))
    values = [schema["const"]] if "const" in schema else schema.get("enum")
    if isinstance(values, list):
        return frozenset(_type_of(v) for v in values)
    if "properties" in schema:
        return frozenset({"object"})
    if "items" in schema:
        return frozenset({"array"})
    return ALL_TYPES


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _params(function: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    params = parameters(function)
    props = params.get("properties")
    required = params.get("required")
    props = props if isinstance(props, dict) else {}
    return props, [r for r in (required if isinstance(required, list) else []) if r in props]


def _typed(text: str, types: frozenset[str]) -> tuple[bool, Any]:
    """A parameter's value from its text: (whether it is one, the value)."""
    if types == frozenset({"string"}):
        return True, text
    try:
        value = json.loads(text)
    except ValueError:
        value = _NOT_JSON
    if value is not _NOT_JSON:
        t = _type_of(value)
        if t in types or (t == "number" and "integer" in types and isinstance(value, int)):
            return True, value
    if "string" in types:
        return True, text
    return False, None


_NOT_JSON = object()


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[ParsedCall]]:
    """The text before the first call as content, and the calls; an answer whose calls do not all
    match (cut short, an unknown function or parameter) is all content, as in llama.cpp."""
    start = text.find(OPEN)
    if start < 0:
        return text, []
    functions = {t["function"]["name"]: t["function"] for t in plan.callable}
    calls: list[ParsedCall] = []
    pos = start
    while True:
        match = _CALL.match(text, pos)
        if match is None or match.group(1) not in functions:
            return text, []
        props, required = _params(functions[match.group(1)])
        args: dict[str, Any] = {}
        pos = match.end()
        while (arg := _ARG.match(text, pos)) is not None:
            name = arg.group(1)
            end = text.find(ARG_CLOSE, arg.end())
            if name not in props or name in args or end < 0:
                return text, []
            ok, value = _typed(text[arg.end() : end], value_types(props[name]))
            if not ok:
                return text, []
            args[name] = value
            pos = end + len(ARG_CLOSE)
        if not text.startswith("</function>\n" + CLOSE, pos) or any(r not in args for r in required):
            return text, []
        calls.append(ParsedCall(match.group(1), compact_json(args)))
        pos += len("</function>\n" + CLOSE)
        rest = text[pos:]
        if not rest.strip():
            break
        if not plan.parallel or not rest.lstrip().startswith(OPEN):
            return text, []
        pos += len(rest) - len(rest.lstrip())
    return (text[:start] or None), calls


def values_schema(plan: ToolPlan) -> dict[str, Any] | None:
    """The schemas of the parameters that cannot be strings, as one object to compile (each under a
    property of its own, whose rule :func:`grammar` takes from the result); None when there are none."""
    props: dict[str, Any] = {}
    for i, (_, _, schema) in enumerate(_json_params(plan)):
        props[f"{_VALUE_KEY}{i}"] = schema
    return {"type": "object", "properties": props, "required": list(props)} if props else None


def _json_params(plan: ToolPlan) -> list[tuple[str, str, Any]]:
    out = []
    for tool in plan.callable:
        props, _ = _params(tool["function"])
        for name, schema in props.items():
            if "string" not in value_types(schema):
                out.append((tool["function"]["name"], name, schema))
    return out


def grammar(plan: ToolPlan, values_grammar: str | None) -> str:
    """The grammar of a forced answer: one call (or with parallel calls one or more), each of a
    callable function with its parameters; ``values_grammar`` is :func:`values_schema` compiled."""
    rules: list[str] = []
    value_rules: dict[tuple[str, str], str] = {}
    have_space = False
    if values_grammar is not None:
        kv = {
            m.group(1): m.group(2)
            for m in re.finditer(rf"^{_VALUE_KEY}(\d+)-kv ::= .*? space (\S+)$", values_grammar, re.M)
        }
        for i, (fn, name, _) in enumerate(_json_params(plan)):
            value_rules[(fn, name)] = kv[str(i)]
        for line in values_grammar.splitlines():
            if line.startswith("root ::="):
                continue
            have_space = have_space or line.startswith("space ::=")
            rules.append(line)
    if not have_space:
        rules.append(r'space ::= | " " | "\n"{1,2} [ \t]{0,20}')
    rules += gbnf.including("xml-arg-string", ARG_CLOSE)
    close = gbnf.gbnf_literal(ARG_CLOSE)
    names = []
    for tool in plan.callable:
        fn = tool["function"]["name"]
        rule = _rule_name(f"tool-{fn}")
        names.append(rule)
        props, required = _params(tool["function"])
        arg_rules: dict[str, str] = {}
        for name in props:
            arg_rule = _rule_name(f"tool-{fn}-arg-{name}")
            value = f"{value_rules[(fn, name)]} {close}" if (fn, name) in value_rules else "xml-arg-string"
            rules.append(f"{arg_rule} ::= {gbnf.gbnf_literal(f'<parameter={name}>' + chr(10))} {value}")
            arg_rules[name] = arg_rule
        args = _permute(rule + "-args", [arg_rules[r] for r in required], rules)
        optional = [arg_rules[n] for n in props if n not in required]
        if optional:
            args = f"{args} ( {' | '.join(optional)} )*".strip()
        head = gbnf.gbnf_literal(f"<function={fn}>\n")
        rules.append(f"{rule} ::= {head} {args} {gbnf.gbnf_literal('</function>' + chr(10))}")
    rules.append(f'tool-call ::= "<tool_call>\\n" ( {" | ".join(names)} ) "</tool_call>" space')
    root = "root ::= tool-call" + (" tool-call*" if plan.parallel else "")
    return "\n".join([root, *rules]) + "\n"


def _permute(prefix: str, items: list[str], rules: list[str]) -> str:
    """Required parameters in any order, as llama.cpp's ``permute`` writes them (one rule per set of
    parameters still to come); in schema order past MAX_PERMUTE."""
    if not items:
        return ""
    if len(items) == 1 or len(items) > MAX_PERMUTE:
        return " ".join(items)
    made: dict[int, str] = {}

    def remaining(mask: int) -> str:
        if mask == 0:
            return ""
        if mask not in made:
            alts = [
                f"{items[i]} {remaining(mask & ~(1 << i))}".strip()
                for i in range(len(items))
                if mask & (1 << i)
            ]
            made[mask] = f"{prefix}-{mask}"
            rules.append(f"{made[mask]} ::= {' | '.join(alts)}")
        return made[mask]

    return remaining((1 << len(items)) - 1)


def _rule_name(name: str) -> str:
    return re.sub(r"[^a-zA-Z0-9-]+", "-", name)
