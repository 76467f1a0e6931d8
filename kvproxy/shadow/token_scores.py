"""Per-token scores of responses whose requests opted in, kept a while per owner.

A client that wants to see *where* the quantized cache disagreed on one answer (the live quality
page's chat box) sends ``X-KVProxy-Token-Scores: keep``. That request's shadow job then reports its
per-position numbers (KLD, same-top: numbers only, never text) into a :class:`KeptScores` slot,
filed under the response's ``id`` in a small bounded store (``GET /kvproxy/v1/scores/{id}``).
Without the header nothing is kept: prompts and completions live only as long as their shadow job.

The route makes the slot and hands it down with the request's other shadow asks
(kvproxy.shadow.ask); the first ticket issued for the request claims it. Filing the slot under the
response's ``id`` is the route's (kvproxy.api.shadow_ask): this module only keeps slots.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from kvproxy.scoring.kept import KeptScores


class TokenScoreStore:
    """Per owner (the API key that made the request: its digest, kvproxy.http.access.key_owner; None when
    the serving routes are open), at most ``capacity`` slots (that owner's oldest go first), each for
    ``ttl`` seconds after its response. An owner reads only its own slots, and its requests evict
    only its own: another key can neither read one nor push it out. Owners are the configured keys,
    so memory stays bounded by ``capacity`` times their number."""

    def __init__(
        self, capacity: int = 64, ttl: float = 600.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.capacity = capacity
        self.ttl = ttl
        self._clock = clock
        self._owners: dict[bytes | None, OrderedDict[str, KeptScores]] = {}

    def __len__(self) -> int:
        self._expire()
        return sum(len(slots) for slots in self._owners.values())

    def new_slot(self) -> KeptScores:
        return KeptScores(created=self._clock())

    def put(self, response_id: str, slot: KeptScores, owner: bytes | None = None) -> None:
        self._expire()
        slots = self._owners.setdefault(owner, OrderedDict())
        slots[response_id] = slot
        slots.move_to_end(response_id)
        while len(slots) > self.capacity:
            slots.popitem(last=False)

    def get(self, response_id: str, owner: bytes | None = None) -> KeptScores | None:
        """``owner``'s slot, or None when unknown, expired or another owner's."""
        self._expire()
        slots = self._owners.get(owner)
        return slots.get(response_id) if slots is not None else None

    def _expire(self) -> None:
        cutoff = self._clock() - self.ttl
        for owner, slots in list(self._owners.items()):
            while slots:
                oldest = next(iter(slots.values()))
                if oldest.created > cutoff:
                    break
                slots.popitem(last=False)
            if not slots:
                del self._owners[owner]
