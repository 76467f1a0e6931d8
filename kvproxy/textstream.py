"""Token bytes in, client-safe text out: UTF-8 reassembly and stop sequences while streaming.

A token can end in the middle of a multi-byte character, and a stop sequence can span several
tokens. The assembler therefore emits only complete characters, and holds back any tail of the text
that could still grow into a stop sequence, so that no byte of a stop sequence ever reaches the
client, streaming or not.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class StopTextAssembler:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit.

        After a stop sequence is found, ``stopped`` is True, the returned text is what preceded it
        and further calls return "".
        """
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(piece)
        if not self._stop:
            self._held = ""
            return text
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            self._held = ""
            return text[:cut]
        hold = self._longest_stop_prefix_suffix(text)
        self._held = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]

    def flush(self) -> str:
        """Generation ended without a stop sequence: release what was held back."""
        if self.stopped:
            return ""
        text = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return text

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop sequence."""
        best = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
