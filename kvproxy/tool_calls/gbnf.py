"""GBNF pieces the native tool-call formats need, written as llama.cpp's PEG grammar builder writes
them (common/peg-parser.cpp): text up to a delimiter as the states of a matching automaton.

A model's free text inside a call (an XML parameter's value, a Gemma 4 string) ends at a delimiter;
GBNF has no "anything but this string", so the rule is the automaton that scans for it (KMP for one
delimiter, the Aho-Corasick llama.cpp builds reduces to it), one rule per state.
"""

from __future__ import annotations

__all__ = ["excluding", "gbnf_literal", "including"]


def gbnf_literal(text: str) -> str:
    """A GBNF string literal (as kvproxy.backends.grammar's, which this module cannot import: that
    one loads llama.cpp)."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def _char_class(chars: list[str], negate: bool) -> str:
    out = "[^" if negate else "["
    for ch in chars:
        if ch in "\\]^-[":
            out += "\\" + ch
        elif ch == "\n":
            out += "\\n"
        elif ch == "\r":
            out += "\\r"
        elif ch == "\t":
            out += "\\t"
        else:
            out += ch
    return out + "]"


def _next_state(delim: str, state: int, ch: str) -> int:
    """The KMP automaton's step: the longest prefix of ``delim`` that ends the text read plus ch."""
    text = delim[:state] + ch
    for k in range(min(len(text), len(delim)), 0, -1):
        if text.endswith(delim[:k]):
            return k
    return 0


def _automaton(prefix: str, delim: str, including: bool) -> list[str]:
    def name(state: int) -> str:
        return prefix if state == 0 else f"{prefix}-{state:02d}"

    alphabet = sorted(set(delim))
    rules = []
    for q in range(len(delim)):
        completing: list[str] = []
        buckets: dict[int, list[str]] = {}
        specific: list[str] = []
        for c in alphabet:
            d = _next_state(delim, q, c)
            if d == len(delim):
                completing.append(c)
                specific.append(c)
            elif d != 0:
                buckets.setdefault(d, []).append(c)
                specific.append(c)
        if including:
            alts = [_char_class(completing, False)] if completing else []
            alts += [f"{_char_class(cs, False)} {name(d)}" for d, cs in sorted(buckets.items())]
            alts.append(f"{_char_class(specific, True)} {name(0)}")
            rhs = " | ".join(alts)
        else:
            rhs = "|"
            for d, cs in sorted(buckets.items()):
                rhs += f" {_char_class(cs, False)} {name(d)} |"
            rhs += f" {_char_class(specific, True)} {name(0)}"
        rules.append(f"{name(q)} ::= {rhs}")
    return rules


def including(prefix: str, delim: str) -> list[str]:
    """Rules (the first named ``prefix``) for any text up to and including the first ``delim``."""
    return _automaton(prefix, delim, including=True)


def excluding(prefix: str, delim: str) -> list[str]:
    """Rules (the first named ``prefix``) for any text that does not contain ``delim``."""
    return _automaton(prefix, delim, including=False)
