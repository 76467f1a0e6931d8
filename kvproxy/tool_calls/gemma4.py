"""Gemma 4's tool-call format (llama.cpp's common/parsers/gemma4.cpp).

The template describes the tools and writes earlier calls and results itself (older Gemma 4
templates want the results folded into the calling assistant message: :func:`history`). The model
writes each call as ``<|tool_call>call:NAME{key:VALUE,...}<tool_call|>``, after any text, where a
value is a string between ``<|"|>`` quotes, a number, ``true``/``false``/``null``, a ``[...]`` list
or a ``{key:value}`` dict. The arguments are that dict as JSON, written as llama.cpp writes it
(numbers as the model wrote them). A required or named choice is forced by llama.cpp's grammar:
the name of a callable function, then any dict (llama.cpp does not apply the parameter schema to
this format: "need to extend json-schema-to-grammar").
"""

from __future__ import annotations

import json
import re
from typing import Any

from kvproxy.tool_calls import gbnf
from kvproxy.tool_calls.spec import ParsedCall, ToolPlan

OPEN = "<|tool_call>call:"
CLOSE = "<tool_call|>"
QUOTE = '<|"|>'
TURN = "<|turn>model\n"
CURRENT_TEMPLATE = "{#- OpenAI Chat Completions:"  # templates without it need history() folded
_NUMBER = re.compile(r"-?(0|[1-9]\d*)(\.\d+)?([eE][-+]?\d+)?")
_SPACE = " \t\n"


class _Fail(ValueError):
    pass


def _esc(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)[1:-1]


class _Reader:
    """Gemma 4 values into JSON text, as llama.cpp's ``gemma4_to_json`` writes them."""

    def __init__(self, text: str, pos: int) -> None:
        self.text, self.pos = text, pos

    def space(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos] in _SPACE:
            self.pos += 1

    def eat(self, lit: str) -> bool:
        if self.text.startswith(lit, self.pos):
            self.pos += len(lit)
            return True
        return False

    def value(self) -> str:
        t, p = self.text, self.pos
        if self.eat(QUOTE):
            end = t.find(QUOTE, self.pos)
            if end < 0:
                raise _Fail("open string")
            self.pos = end + len(QUOTE)
            return '"' + _esc(t[p + len(QUOTE) : end]) + '"'
        if t.startswith("{", p):
            return self.dict()
        if t.startswith("[", p):
            return self.array()
        for lit in ("true", "false", "null"):
            if self.eat(lit):
                return lit
        m = _NUMBER.match(t, p)
        if m is None:
            raise _Fail("no value")
        self.pos = m.end()
        return m.group(0)

    def dict(self) -> str:
        self.eat("{")
        self.space()
        if self.eat("}"):
            return "{}"
        members = []
        while True:
            colon = self.pos
            while colon < len(self.text) and self.text[colon] not in ":}":
                colon += 1
            if colon == self.pos or colon >= len(self.text) or self.text[colon] != ":":
                raise _Fail("no key")
            key = self.text[self.pos : colon]
            self.pos = colon + 1
            self.space()
            members.append('"' + _esc(key) + '":' + self.value())
            if self.eat(","):
                self.space()
                continue
            self.space()
            if not self.eat("}"):
                raise _Fail("open dict")
            return "{" + ",".join(members) + "}"

    def array(self) -> str:
        self.eat("[")
        self.space()
        if self.eat("]"):
            return "[]"
        items = []
        while True:
            items.append(self.value())
            if self.eat(","):
                self.space()
                continue
            self.space()
            if not self.eat("]"):
                raise _Fail("open list")
            return "[" + ",".join(items) + "]"


def parse(text: str, plan: ToolPlan) -> tuple[str | None, list[ParsedCall]]:
    """The text before the first call as content, and the calls; an answer whose calls do not all
    parse (cut short, an unknown function) is all content."""
    if text.startswith(TURN):  # llama.cpp's grammar and parser allow the turn's header again
        text = text[len(TURN) :]
    start = text.find(OPEN)
    if start < 0:
        return text, []
    names = sorted((t["function"]["name"] for t in plan.callable), key=len, reverse=True)
    calls: list[ParsedCall] = []
    pos = start
    while pos < len(text):
        if not text.startswith(OPEN, pos):
            return text, []
        pos += len(OPEN)
        name = next((n for n in names if text.startswith(n + "{", pos)), None)
        if name is None:
            return text, []
        reader = _Reader(text, pos + len(name))
        try:
            arguments = reader.dict()
        except _Fail:
            return text, []
        if not text.startswith(CLOSE, reader.pos):
            return text, []
        calls.append(ParsedCall(name, arguments))
        pos = reader.pos + len(CLOSE)
        if pos < len(text) and not plan.parallel:
            return text, []
    return (text[:start] or None), calls


def grammar(plan: ToolPlan) -> str:
    """The grammar of a forced answer: one call (or with parallel calls one or more) of a callable
    function, with any dict as its arguments. llama.cpp's also allows a thought block (and the turn's
    header) first; on the side-by-side model that free text ran to the token limit where llama-server
    called at once, so here the call comes first (docs/function-calling.md)."""
    names = [t["function"]["name"] for t in plan.callable]
    tools = []
    for name in names:
        rule = "tool-" + re.sub(r"[^a-zA-Z0-9-]+", "-", name)
        tools.append(f"{rule} ::= {gbnf.gbnf_literal(name)} gemma4-dict")
    repeat = "+" if plan.parallel else ""
    call = (
        f'( "<|tool_call>call:" ( {" | ".join(t.split(" ::=")[0] for t in tools)} ) "<tool_call|>" ){repeat}'
    )
    rules = [
        f"root ::= {call}",
        *tools,
        'gemma4-string ::= "<|\\"|>" gemma4-string-content "<|\\"|>"',
        *gbnf.excluding("gemma4-string-content", QUOTE),
        'gemma4-bool ::= "true" | "false"',
        'gemma4-null ::= "null"',
        'gemma4-number ::= "-"? ([0-9] | [1-9] [0-9]{0,15}) ("." [0-9]+)? ([eE] [-+]? [0-9]{1,15})?',
        'gemma4-dict-key ::= [^:}]+ ":"',
        "gemma4-dict-kv ::= gemma4-dict-key space gemma4-value",
        'gemma4-dict ::= "{" space ( "}" | gemma4-dict-kv ( "," space gemma4-dict-kv )* space "}" )',
        'gemma4-array ::= "[" space ( "]" | gemma4-value ( "," space gemma4-value )* space "]" )',
        "gemma4-value ::= gemma4-string | gemma4-dict | gemma4-array | gemma4-number | gemma4-bool"
        " | gemma4-null",
        r'space ::= | " " | "\n"{1,2} [ \t]{0,20}',
    ]
    return "\n".join(rules) + "\n"


def history(messages: list[dict[str, Any]], template: str) -> list[dict[str, Any]]:
    """For an older Gemma 4 template (without the OpenAI section), an assistant message with calls
    takes the tool results after it as ``tool_responses`` (and the plain answer after those as its
    content), as llama.cpp's ``convert_tool_responses_gemma4`` does; a current template reads
    ``role: tool`` messages itself."""
    if CURRENT_TEMPLATE in template:
        return messages
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(messages):
        msg = messages[i]
        if msg.get("role") != "assistant" or not msg.get("tool_calls"):
            out.append(msg)
            i += 1
            continue
        calls = list(msg["tool_calls"])
        folded: dict[str, Any] = {"role": "assistant", "tool_calls": calls}
        if isinstance(msg.get("reasoning_content"), str):
            folded["reasoning_content"] = msg["reasoning_content"]
        responses: list[dict[str, Any]] = []
        i += 1
        while i < len(messages) and messages[i].get("role") == "tool":
            responses.append(_response(messages[i], calls, len(responses)))
            i += 1
        if responses:
            folded["tool_responses"] = responses
        if i < len(messages) and messages[i].get("role") == "assistant" and not messages[i].get("tool_calls"):
            content = messages[i].get("content")
            if content:
                folded["content"] = content
                i += 1
        out.append(folded)
    return out


def _response(msg: dict[str, Any], calls: list[dict[str, Any]], index: int) -> dict[str, Any]:
    content = msg.get("content")
    response: Any = content
    if isinstance(content, str):
        try:
            response = json.loads(content)
        except ValueError:
            response = content
    name = calls[index].get("function", {}).get("name", "") if index < len(calls) else ""
    return {"name": name or msg.get("tool_call_id", ""), "response": response}
