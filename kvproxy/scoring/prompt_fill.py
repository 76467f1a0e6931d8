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
(docs/production.md). Pure functions, no llama.cpp.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property


@dataclass(frozen=True)
class PromptFill:
    """How the serving process was started (``-b``, ``-ub``, ``--ctx-checkpoints`` > 0,
    ``--checkpoint-min-step``) and, for one prompt, where its user messages start (token positions
    of llama-server's message spans; empty when it knows none)."""

    batch: int = 2048
    ubatch: int = 512
    checkpoints: bool = True
    checkpoint_min_step: int = 8192
    user_starts: tuple[int, ...] = ()

    def for_prompt(self, user_starts: Iterable[int]) -> PromptFill:
        """The same server, for a prompt whose user messages start at ``user_starts``."""
        return dataclasses.replace(self, user_starts=tuple(sorted(set(user_starts))))

    def pieces(self, n: int, *, cuts_apply: bool) -> list[tuple[int, int]]:
        """The micro-batches llama.cpp computes a prompt of ``n`` tokens in: the server's calls,
        each split into ``ubatch``-sized pieces from its start (as llama.cpp splits one sequence).
        ``cuts_apply``: the model has sliding-window layers (no ``--swa-full``) or recurrent state."""
        out = []
        for start, end in self.calls(n, cuts_apply=cuts_apply):
            out += [(i, min(i + self.ubatch, end)) for i in range(start, end, self.ubatch)]
        return out

    def calls(self, n: int, *, cuts_apply: bool) -> list[tuple[int, int]]:
        """The server's ``llama_decode`` calls for a prompt of ``n`` tokens, one slot, nothing cached."""
        if not (cuts_apply and self.checkpoints):
            return [(i, min(i + self.batch, n)) for i in range(0, n, self.batch)]
        calls: list[tuple[int, int]] = []
        newest: int | None = None  # where the newest checkpoint starts (its n_tokens)
        start = 0
        while start < n:
            end = self._call_end(start, n, newest)
            if start > 0 and self._checkpoints_at(start, end, n, newest):
                newest = start
            calls.append((start, end))
            start = end
        return calls

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
