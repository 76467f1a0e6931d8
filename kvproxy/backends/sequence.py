"""What one request's sampled tokens become: text cut at stop sequences, logprobs, one Finished.

The slot scheduler (:mod:`kvproxy.backends.slots`) samples a token for a sequence and hands it here
with a way to read the logits row it was sampled from (valid until the next decode). This object
decides whether the sequence goes on, and sends the request's events through ``emit``, which puts
them on the event loop. It knows nothing of batching: the same code serves one slot or many.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
import numpy.typing as npt

from kvproxy.backends.base import (
    Finished,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
    TokenLogprob,
    TopLogprob,
)
from kvproxy.kld import log_softmax
from kvproxy.textstream import StopTextAssembler

Emit = Callable[[GenerationEvent | BaseException], None]
Row = Callable[[], npt.NDArray[np.float32]]


class Vocabulary(Protocol):
    def is_end_of_generation(self, token: int) -> bool: ...

    def piece(self, token: int) -> bytes: ...

    def special_piece(self, token: int) -> bytes: ...


class SequenceOutput:
    """Turns one request's tokens into events; :meth:`push` says when the sequence is done."""

    def __init__(self, request: GenerationRequest, vocab: Vocabulary, emit: Emit) -> None:
        self.request = request
        self._vocab = vocab
        self._emit = emit
        self._assembler = StopTextAssembler(request.stop)
        self._pending: list[TokenLogprob] = []
        self._produced: list[int] = []
        self._n_completion = 0
        self._finish: str = "length"
        self.done = False

    def push(self, token: int, row: Row) -> bool:
        """Take one sampled token; True when the sequence ends with it (end of generation, a stop
        sequence, or the token budget)."""
        self._produced.append(token)
        if self._vocab.is_end_of_generation(token):
            self._finish = "stop"
            return self._end()
        self._n_completion += 1
        n_top = self.request.top_logprobs
        if n_top is not None:
            self._pending.append(self._token_logprob(row(), token, n_top))
        special = token in self.request.special_tokens  # a reasoning template's tags, spelled out
        piece = self._vocab.special_piece(token) if special else self._vocab.piece(token)
        text = self._assembler.push(piece)
        if text or self._assembler.stopped:
            self._emit(TextDelta(text, tuple(self._pending)))
            self._pending = []
        if self._assembler.stopped:
            self._finish = "stop"
            return self._end()
        if self._n_completion >= self.request.max_tokens:
            return self._end()
        return False

    def _end(self) -> bool:
        tail = self._assembler.flush()
        if tail or self._pending:
            self._emit(TextDelta(tail, tuple(self._pending)))
            self._pending = []
        self._emit(
            Finished(
                finish_reason="stop" if self._finish == "stop" else "length",
                prompt_tokens=len(self.request.prompt_tokens),
                completion_tokens=self._n_completion,
                token_ids=tuple(self._produced),
            )
        )
        self.done = True
        return True

    def end(self) -> None:
        """End the sequence here (finish reason ``length``), if it has not ended."""
        if not self.done:
            self._end()

    def fail(self, exc: BaseException) -> None:
        """The sequence could not go on (a llama.cpp failure): the request gets the error."""
        if not self.done:
            self.done = True
            self._emit(exc)

    def _token_logprob(self, row: npt.NDArray[np.float32], token: int, n_top: int) -> TokenLogprob:
        logprobs = log_softmax(row)
        piece = self._vocab.piece
        top: tuple[TopLogprob, ...] = ()
        if n_top > 0:
            idx = np.argpartition(logprobs, -n_top)[-n_top:]
            idx = idx[np.argsort(-logprobs[idx], kind="stable")]
            top = tuple(TopLogprob(int(i), piece(int(i)), float(logprobs[i])) for i in idx)
        return TokenLogprob(token, piece(token), float(logprobs[token]), top)
