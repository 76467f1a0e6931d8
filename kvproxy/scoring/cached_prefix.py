"""Which cached prefix a llama-server slot reused for a prompt, and the calls it computed it in.

llama-server reports how many prompt tokens it took from the slot (``timings.cache_n``) but not
whose they were. With ``cache_prompt`` on (the chat route's default) a chat's next turn usually
lands on the slot that served its previous turn, and on a sliding-window model the slot restores
the previous turn's newest checkpoint at or before the common prefix (kvproxy.scoring.prompt_fill):
the rows it reuses were computed in the previous turn's calls, and the new prompt's calls start
where the restored prefix ends, with the previous turn's checkpoints in place. A replay that
computes the prompt from nothing scores other rows (docs/production.md, "A cached prefix").

So a replay of a prompt with ``cache_n`` > 0 needs a guess at what the slot held, checked against
``cache_n``. The guesses, in order (:func:`replay_calls`):

* the conversation's previous turn: the conversation up to its last assistant message, rendered with
  the generation prompt, as that turn's request was; itself computed after the turn before it, and
  so on back to the first turn, computed from nothing (every earlier turn assumed served on the same
  slot, its ``cache_n`` as predicted: only the last one is reported);
* the same prompt sent again (a retry), computed as the first guess says it was;
* any prompt that opened with a user message: its checkpoint at position 1 is restored for a prompt
  that shares only the BOS (``cache_n`` 1).

A guess explains the job when its predicted ``cache_n`` is the reported one; when none does (another
conversation's prefix, llama-server's RAM prompt cache, a slot's older checkpoints, a model whose
memory is not a sliding window that keeps the whole prompt), the job is not replayable and is not
scored. Pure functions, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvproxy.scoring.prompt_fill import Call, Filled, PromptFill, common_prefix, restored_prefix

# what a slot holds after serving a prompt that opened with a user message at 1 (behind the BOS):
# its first call was (0, 1) and a checkpoint was saved before the next one, at 1
USER_OPENED = Filled(((0, 1),), (1,))


@dataclass(frozen=True)
class Prompt:
    """A prompt's token ids and where llama-server saw its user messages start."""

    tokens: tuple[int, ...]
    user_starts: tuple[int, ...] = ()

    @property
    def n(self) -> int:
        return len(self.tokens)


def continued(fill: PromptFill, previous: tuple[Prompt, Filled] | None, prompt: Prompt) -> tuple[int, Filled]:
    """The ``cache_n`` llama-server would report for ``prompt`` on the slot that last computed
    ``previous`` (a prompt and how it was computed; None: an empty slot), and how it computes
    ``prompt`` then."""
    own = fill.for_prompt(prompt.user_starts)
    if previous is None:
        return 0, own.fill(prompt.n, cuts_apply=True)
    before, filled = previous
    cache_n = restored_prefix(filled, common_prefix(before.tokens, prompt.tokens), prompt.n)
    if cache_n == 0:
        return 0, own.fill(prompt.n, cuts_apply=True)
    return cache_n, own.after(filled, prompt.n, cache_n)


def conversation_fill(fill: PromptFill, turns: Sequence[Prompt]) -> tuple[Prompt, Filled] | None:
    """The last of ``turns`` (a conversation's requests, oldest first) as its slot computed it, each
    turn after the one before on the same slot with the ``cache_n`` predicted for it."""
    served: tuple[Prompt, Filled] | None = None
    for prompt in turns:
        served = (prompt, continued(fill, served, prompt)[1])
    return served


def replay_calls(
    fill: PromptFill, earlier: Sequence[Prompt], prompt: Prompt, cache_n: int
) -> tuple[Call, ...] | None:
    """The calls llama-server computed ``prompt`` in after reusing ``cache_n`` tokens of its slot
    (a sliding-window model), given the conversation's earlier requests (``earlier``, oldest first:
    each previous turn's prompt with the generation prompt); None when no guess (module docstring)
    predicts ``cache_n``."""
    if cache_n <= 0:
        return tuple(fill.for_prompt(prompt.user_starts).fill(prompt.n, cuts_apply=True).calls)
    previous = conversation_fill(fill, earlier)
    predicted, filled = continued(fill, previous, prompt)
    if previous is not None and predicted == cache_n:
        return filled.calls
    own = fill.for_prompt(prompt.user_starts)
    again = restored_prefix(filled, prompt.n, prompt.n)
    if again == cache_n:
        return own.after(filled, prompt.n, cache_n).calls
    if restored_prefix(USER_OPENED, 1, prompt.n) == cache_n:  # the two share the BOS at least
        return own.after(USER_OPENED, prompt.n, cache_n).calls
    return None
