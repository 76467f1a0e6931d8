"""How a server fed a prompt to llama.cpp, so a replay can feed it the same way.

The rows a generation serves depend on how its prompt was cut into ``llama_decode`` calls: the K and
V of a token computed in a call of 4 rows differ slightly from the same token's in a call of 85, and
every later row attends to them. kvproxy's embedded generation prefills a prompt in calls of
``--batch-size`` tokens. llama-server (tools/server/server-context.cpp, update_slots) does too,
except that where it may save context checkpoints (``--ctx-checkpoints`` > 0, its default 32, on a
model with sliding-window layers not run with ``--swa-full``, or with recurrent state) it also cuts
where ``min(batch, ubatch + 4)`` and where ``min(batch, 4)`` prompt tokens remain ("process the last
few tokens of the prompt separately", llama.cpp PR 20288). A replay that prefills in one call then
differs from the served rows by about as much as the prefill and decode paths differ; with the same
cuts it agrees to float32 rounding (docs/production.md). Pure functions, no llama.cpp.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptFill:
    """How the serving process was started: ``-b``, ``-ub`` and ``--ctx-checkpoints`` > 0."""

    batch: int = 2048
    ubatch: int = 512
    checkpoints: bool = True

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
        cuts = (
            {n - min(self.batch, self.ubatch + 4), n - min(self.batch, 4)}
            if cuts_apply and self.checkpoints
            else set()
        )
        calls, pos = [], 0
        while pos < n:
            end = min(n, pos + self.batch)
            inside = [c for c in cuts if pos < c < end]
            end = min(inside) if inside else end
            calls.append((pos, end))
            pos = end
        return calls
