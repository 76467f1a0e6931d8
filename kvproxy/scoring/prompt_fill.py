"""How a server fed a prompt to llama.cpp, so a replay can feed it the same way.

The rows a generation serves depend on how its prompt was cut into ``llama_decode`` calls: the K and
V of a token computed in a call of 4 rows differ slightly from the same token's in a call of 85, and
every later row attends to them. kvproxy's embedded generation prefills a prompt in calls of
``--batch-size`` tokens. llama-server (tools/server/server-context.cpp, update_slots) does too,
except that where it may save context checkpoints (``--ctx-checkpoints`` > 0, its default 32, on a
model with sliding-window layers not run with ``--swa-full``, or with recurrent state) it also cuts:

* where ``min(batch, ubatch + 4)`` and ``min(batch, 4)`` prompt tokens remain ("process the last few
  tokens of the prompt separately", llama.cpp PR 20288);
* at the start of a user message (Jinja templates only: the chat template's message delimiters tell
  llama-server where messages start; legacy templates and raw completions have none): always at the
  last one, and at an earlier one while no checkpoint exists yet or when it lies more than
  ``--checkpoint-min-step`` (8192) tokens past the newest checkpoint.

A checkpoint is saved before a call that starts a user message or ends within a micro-batch of the
prompt's end (never before the first call: nothing is in memory yet), subject to the same spacing
unless it starts the last user message or is near the end. So the cuts depend on the checkpoints and
the checkpoints on the cuts; :meth:`PromptFill.calls` runs both as llama-server does, for one slot
with nothing cached. A replay that prefills in one call differs from the served rows by about as much
as the prefill and decode paths differ; with the same cuts it agrees to float32 rounding
(docs/production.md).

With ``cache_prompt`` (the chat route's default) a request that shares a prefix with what its slot
holds starts from a cached prefix instead. On a sliding-window model (prompts within the window)
llama-server restores the newest checkpoint at or before the common prefix, so it reuses that
checkpoint's size less one token (``timings.cache_n``), computes the rest with the same loop begun
there, and keeps the checkpoints at or before the restored point. :class:`Filled` is a prompt as
the slot left it (its calls and checkpoints), :func:`restored_prefix` predicts ``cache_n`` from it
and :meth:`PromptFill.after` gives the next prompt's calls: the earlier prompt's calls clipped at
``cache_n``, then the loop from ``cache_n``. Pure functions, no llama.cpp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

Call = tuple[int, int]  # one llama_decode call: prompt tokens [start, end)


@dataclass(frozen=True)
class Filled:
    """One prompt as a llama-server slot computed it: its ``llama_decode`` calls, and where the
    context checkpoints the slot keeps after it were taken (their ``n_tokens``, oldest first)."""

    calls: tuple[Call, ...]
    checkpoints: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return self.calls[-1][1] if self.calls else 0


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two prompts share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def restored_prefix(previous: Filled, common: int, n: int) -> int:
    """``timings.cache_n`` llama-server reports for a prompt of ``n`` tokens that shares ``common``
    leading tokens with what its slot holds (``previous``, and maybe tokens generated after it), on a
    sliding-window model whose prompts fit the window (the memory's smallest position stays 0, so the
    checkpoint search always runs: server-context.cpp, ``pos_min >= pos_min_thold``).

    The newest checkpoint whose last position (``n_tokens - 1``) is at or before ``common`` is
    restored: ``n_past = min(common, max(pos_min + 1, pos_max), n_tokens)`` with ``pos_min`` 0, so
    its size less one (1 for a checkpoint at 1); none: nothing is reused. At least one token is
    always computed."""
    if common <= 0:
        return 0
    found = [c for c in previous.checkpoints if c - 1 <= common]
    if not found:
        return 0
    c = found[-1]
    return min(common, max(1, c - 1), c, n - 1)


@dataclass(frozen=True)
class PromptFill:
    """How the serving process was started (``-b``, ``-ub``, ``--ctx-checkpoints`` > 0,
    ``--checkpoint-min-step``) and, for one prompt, where its user messages start (token positions
    of llama-server's message spans; empty when it knows none) or, when known, the calls it made
    (``given``: a prompt that started from a cached prefix, :meth:`after`)."""

    batch: int = 2048
    ubatch: int = 512
    checkpoints: bool = True
    checkpoint_min_step: int = 8192
    user_starts: tuple[int, ...] = ()
    given: tuple[Call, ...] | None = None

    def for_prompt(self, user_starts: Iterable[int]) -> PromptFill:
        """The same server, for a prompt whose user messages start at ``user_starts``."""
        return dataclasses.replace(self, user_starts=tuple(sorted(set(user_starts))), given=None)

    def with_calls(self, calls: Iterable[Call]) -> PromptFill:
        """The same server, for a prompt it computed in ``calls`` (in order, covering it from 0)."""
        given = tuple((int(a), int(b)) for a, b in calls)
        check_calls(given, given[-1][1] if given else 0)
        return dataclasses.replace(self, given=given)

    def pieces(self, n: int, *, cuts_apply: bool) -> list[tuple[int, int]]:
        """The micro-batches llama.cpp computes a prompt of ``n`` tokens in: the server's calls,
        each split into ``ubatch``-sized pieces from its start (as llama.cpp splits one sequence).
        ``cuts_apply``: the model has sliding-window layers (no ``--swa-full``) or recurrent state."""
        out = []
        for start, end in self.calls(n, cuts_apply=cuts_apply):
            out += [(i, min(i + self.ubatch, end)) for i in range(start, end, self.ubatch)]
        return out

    def calls(self, n: int, *, cuts_apply: bool) -> list[tuple[int, int]]:
        """The server's ``llama_decode`` calls for a prompt of ``n`` tokens: the given ones, or those
        of one slot with nothing cached."""
        if self.given is not None:
            check_calls(self.given, n)
            return list(self.given)
        return list(self.fill(n, cuts_apply=cuts_apply).calls)

    def fill(self, n: int, *, cuts_apply: bool) -> Filled:
        """A prompt of ``n`` tokens computed in an empty slot: its calls and checkpoints."""
        if not (cuts_apply and self.checkpoints):
            return Filled(tuple((i, min(i + self.batch, n)) for i in range(0, n, self.batch)))
        return self._loop(0, n, ())

    def after(self, previous: Filled, n: int, cache_n: int) -> Filled:
        """A prompt of ``n`` tokens computed after its slot restored ``cache_n`` tokens of
        ``previous`` (the prompt the slot computed before; a sliding-window model, checkpoints on):
        ``previous``'s calls clipped at ``cache_n``, then the loop from ``cache_n`` with the
        checkpoints that survive the restore (those whose last position is at or before
        ``cache_n``: an earlier user start is then no cut unless far enough past them)."""
        if not 0 < cache_n <= min(previous.n, n - 1):
            raise ValueError(f"a cached prefix of {cache_n} tokens of {previous.n} for a prompt of {n}")
        head = tuple((a, min(b, cache_n)) for a, b in previous.calls if a < cache_n)
        kept = tuple(c for c in previous.checkpoints if c - 1 <= cache_n)
        rest = self._loop(cache_n, n, kept)
        return Filled(head + rest.calls, rest.checkpoints)

    def _loop(self, start: int, n: int, checkpoints: tuple[int, ...]) -> Filled:
        """llama-server's prompt loop from ``start`` (tokens before it in memory) with the slot's
        ``checkpoints``: where it cuts, and the checkpoints it saves on the way."""
        calls: list[Call] = []
        kept = list(checkpoints)
        while start < n:
            newest = kept[-1] if kept else None
            end = self._call_end(start, n, newest)
            if start > 0 and self._checkpoints_at(start, end, n, newest):
                kept = [c for c in kept if c != start] + [start]  # one at the same size is replaced
            calls.append((start, end))
            start = end
        return Filled(tuple(calls), tuple(kept))

    def _call_end(self, start: int, n: int, newest: int | None) -> int:
        """Where a call from ``start`` ends: llama-server fills the batch token by token and stops
        at ``batch`` tokens, at the prompt's end, or after a token that a cut follows."""
        end = min(n, start + self.batch)
        return next((pos for pos in range(start + 1, end) if self._cuts_at(pos, n, newest)), end)

    def _cuts_at(self, pos: int, n: int, newest: int | None) -> bool:
        """Whether the batch stops before token ``pos`` (``pos`` tokens are in)."""
        if pos in self._starts and (
            pos == self._last_user or newest is None or pos > newest + self.checkpoint_min_step
        ):
            return True
        return n - pos in (min(self.batch, self.ubatch + 4), min(self.batch, 4))

    def _checkpoints_at(self, start: int, end: int, n: int, newest: int | None) -> bool:
        """Whether llama-server saves a checkpoint before computing the call ``[start, end)``
        (``start`` > 0: something is in memory)."""
        near_end = n < end + self.ubatch
        if start not in self._starts and not near_end:
            return False  # an ordinary mid-prompt call
        return (
            newest is None
            or start == self._last_user
            or near_end
            or start > newest + self.checkpoint_min_step
        )

    @property
    def _last_user(self) -> int:
        return max(self.user_starts, default=-1)

    @cached_property
    def _starts(self) -> frozenset[int]:
        return frozenset(self.user_starts)


def check_calls(calls: Sequence[Call], n: int) -> None:
    """A ValueError unless ``calls`` cover ``[0, n)`` in order, each at least one token."""
    at = 0
    for a, b in calls:
        if a != at or b <= a:
            raise ValueError(f"the calls {list(calls)} do not cover a prompt of {n} tokens in order")
        at = b
    if at != n or n <= 0:
        raise ValueError(f"the calls {list(calls)} do not cover a prompt of {n} tokens in order")
