"""Special-token text written in message content is plain text (issue 25, finding 14).

A chat template spells its control tokens out as text (``<start_of_turn>``, ``<|im_start|>``) and the
prompt is tokenized with special tokens parsed, so llama-server also reads those strings as control
tokens when a user (or a tool's output) writes them: a user message can close its own turn and open
a forged system or model turn. kvproxy's embedded backend keeps them as text by default: before the
template runs, each control-token text found in user and tool content is swapped for a sentinel, and
the rendered prompt is tokenized piece by piece, the template's pieces with special tokens parsed,
the user's control-token texts without. llama.cpp itself cuts a prompt into pieces at every special
token it finds, so a prompt without such text in its content tokenizes exactly as before (one call,
as llama-server); one with it differs only there (``--parse-special-in-content`` restores
llama-server's reading).

In proxy mode llama-server tokenizes the prompt itself, from the request's messages: kvproxy cannot
make it read content as text without changing what the client sent (docs/production.md).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

# roles whose content is not the application's own: what a user typed, what a tool returned
UNTRUSTED_ROLES = frozenset({"user", "tool", "function"})
_PRIVATE_USE = range(0xE000, 0xF8FF)


@dataclass
class Literals:
    """Control-token texts taken out of content, and the sentinels that hold their places."""

    open: str
    close: str
    texts: list[str] = field(default_factory=list)

    def mark(self, text: str, found: list[str]) -> str:
        for special in found:  # longest first: llama.cpp matches the longest special token
            if special in text:
                text = text.replace(special, f"{self.open}{len(self.texts)}{self.close}")
                self.texts.append(special)
        return text

    def pieces(self, prompt: str) -> Iterator[tuple[str, bool]]:
        """The rendered prompt as (text, is_literal) pieces, in order, the sentinels resolved."""
        pattern = re.compile(f"{re.escape(self.open)}(\\d+){re.escape(self.close)}")
        at = 0
        for m in pattern.finditer(prompt):
            if m.start() > at:
                yield prompt[at : m.start()], False
            yield self.texts[int(m.group(1))], True
            at = m.end()
        if at < len(prompt):
            yield prompt[at:], False

    def restore(self, prompt: str) -> str:
        return "".join(text for text, _ in self.pieces(prompt))


def _sentinels(messages: list[dict[str, Any]]) -> tuple[str, str]:
    """Two private-use characters that no message uses (a client cannot forge a sentinel)."""
    used = set("".join(_texts(messages)))
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    return next(free), next(free)


def _texts(messages: list[dict[str, Any]]) -> Iterator[str]:
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            yield from (str(p.get("text", "")) for p in content if isinstance(p, dict))


def mark_literals(
    messages: list[dict[str, Any]], find: Callable[[str], list[str]]
) -> tuple[list[dict[str, Any]], Literals]:
    """``messages`` with the control-token texts of user and tool content (``find`` names them,
    longest first) swapped for sentinels; the :class:`Literals` that resolve them."""
    literals = Literals(*_sentinels(messages))
    out = []
    for m in messages:
        content = m.get("content")
        if m.get("role") not in UNTRUSTED_ROLES or not content:
            out.append(m)
        elif isinstance(content, str):
            out.append({**m, "content": literals.mark(content, find(content))})
        elif isinstance(content, list):
            parts = [
                {**p, "text": literals.mark(p["text"], find(p["text"]))}
                if isinstance(p, dict) and isinstance(p.get("text"), str)
                else p
                for p in content
            ]
            out.append({**m, "content": parts})
        else:
            out.append(m)
    return out, literals
