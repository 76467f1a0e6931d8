"""Per-token scores of one response, kept only when its request opts in.

A client that wants to see *where* the quantized cache disagreed on one answer (the live quality
page's chat box) sends ``X-KVProxy-Token-Scores: keep``. That request's shadow job then reports its
per-position numbers (KLD, same-top: numbers only, never text) into a :class:`KeptScores` slot,
filed under the response's ``id`` in a small bounded store (``GET /kvproxy/v1/scores/{id}``).
Without the header nothing is kept: prompts and completions live only as long as their shadow job.

The slot travels from the route to the shadow ticket in a context variable, so the serving code of
every deployment kind (embedded, relay, guarded) keeps its signature: the first ticket created while
the request is served claims it (a guard's background probe, started later, finds it taken).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from contextvars import ContextVar
from typing import Any

import orjson
from fastapi.responses import Response, StreamingResponse

from kvproxy import sse
from kvproxy.scoring.kept import NOT_SAMPLED, KeptScores

TOKEN_SCORES_HEADER = "X-KVProxy-Token-Scores"


def parse_token_scores_header(value: str | None) -> bool:
    """True for ``keep`` (any case), False when absent; anything else is a ValueError."""
    if value is None:
        return False
    if value.strip().lower() == "keep":
        return True
    raise ValueError(f"{TOKEN_SCORES_HEADER} must be 'keep', not {value!r}")


_current: ContextVar[KeptScores | None] = ContextVar("kvproxy_kept_scores", default=None)


def claim() -> KeptScores | None:
    """The slot of the request being served, for its first shadow ticket only."""
    slot = _current.get()
    if slot is None or slot.claimed:
        return None
    slot.claimed = True
    return slot


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

    async def serve(self, respond: Callable[[], Any], owner: bytes | None = None) -> Response:
        """Run one opted-in request's handler with a fresh slot current; file the slot under the
        response's ``id`` (a stream's: from its first event), as ``owner``'s."""
        slot = self.new_slot()
        token = _current.set(slot)
        try:
            response: Response = await respond()
        finally:
            _current.reset(token)
        if not slot.claimed:  # not sampled (shadow skipped or shed): nothing will come
            slot.end(NOT_SAMPLED)
        if isinstance(response, StreamingResponse):
            response.body_iterator = self._file_from_stream(response.body_iterator, slot, owner)
        else:
            rid = _response_id(bytes(response.body))
            if rid is not None:
                self.put(rid, slot, owner)
        return response

    async def _file_from_stream(
        self, chunks: AsyncIterable[str | bytes | memoryview], slot: KeptScores, owner: bytes | None
    ) -> AsyncIterator[str | bytes | memoryview]:
        filed = False
        async for chunk in chunks:
            if not filed:
                data = chunk.encode() if isinstance(chunk, str) else bytes(chunk)
                rid = _response_id(sse.first_data(data) or b"")
                if rid is not None:
                    self.put(rid, slot, owner)
                    filed = True
            yield chunk


def _response_id(body: bytes) -> str | None:
    """A response's ``id``: at the top of a completion or a chunk, inside ``response`` for the
    Responses API's object's first event (``response.created``)."""
    try:
        data = orjson.loads(body)
    except ValueError:
        return None
    if isinstance(data, dict) and isinstance(data.get("response"), dict):
        data = data["response"]
    rid = data.get("id") if isinstance(data, dict) else None
    return rid if isinstance(rid, str) and rid else None
