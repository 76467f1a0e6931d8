"""Server-sent events: the one codec every reader and writer of an SSE stream in kvproxy uses.

Writing: :func:`encode` frames one JSON payload as ``data: ...`` and a blank line (LF line ends, as
llama-server and OpenAI send). Reading: :class:`SSEDecoder` takes bytes as they arrive and gives back
whole events, following the WHATWG parsing rules that matter here: lines end in LF, CRLF or a lone CR
(sse-starlette, and so llama-cpp-python's own server, sends CRLF), a blank line ends an event, lines
starting with ``:`` are comments, several ``data:`` lines join with LF, one space after the colon is
dropped. Each event keeps its exact bytes (``raw``), so a relay can pass through the events it does
not rewrite byte for byte, and cut a stream only at event boundaries.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import BaseModel

DONE_DATA = b"[DONE]"
DONE = b"data: [DONE]\n\n"
_LINE_END = re.compile(rb"\r\n|\r|\n")


def encode(
    payload: BaseModel | dict[str, Any] | bytes,
    *,
    exclude: set[str] | None = None,
    newline: bytes = b"\n",
    event: str | None = None,
) -> bytes:
    """One event carrying a JSON payload (``bytes`` are taken as JSON already serialized); a relay
    that rewrites an upstream's event passes that event's ``newline`` to keep its framing. ``event``
    names the event (an ``event:`` line first, as the Responses API's streams have)."""
    if isinstance(payload, BaseModel):
        body = payload.model_dump_json(exclude=exclude).encode()
    elif isinstance(payload, bytes):
        body = payload
    else:
        body = orjson.dumps(payload)
    head = b"event: " + event.encode() + newline if event else b""
    return head + b"data: " + body + newline + newline


@dataclass(frozen=True)
class Event:
    raw: bytes  # the event's bytes as received, its blank line included
    data: bytes | None  # the data lines joined with LF; None when the event has no data field
    event: str | None = None
    id: str | None = None
    newline: bytes = b"\n"  # the event's first line end: LF, CRLF or CR

    @property
    def is_done(self) -> bool:
        return self.data is not None and self.data.strip() == DONE_DATA


def complete_length(buffer: bytes, *, final: bool = False) -> int:
    """How many leading bytes of ``buffer`` (which starts at an event boundary) are whole events.

    A trailing lone CR is not trusted as a line end yet, it may be the first half of a CRLF; unless
    the stream has ended (``final``).
    """
    if b"\r" not in buffer:  # the usual case: LF only
        if buffer.endswith(b"\n\n"):
            return len(buffer)
        cut = buffer.rfind(b"\n\n")
        return cut + 2 if cut >= 0 else 0
    end = line_start = 0
    for m in _LINE_END.finditer(buffer):
        if m.end() == len(buffer) and m.group() == b"\r" and not final:
            break
        if m.start() == line_start:  # an empty line: the event before it is complete
            end = m.end()
        line_start = m.end()
    return end


def parse_events(block: bytes) -> list[Event]:
    """The events of a run of whole events (as :func:`complete_length` cuts them)."""
    events: list[Event] = []
    start = line_start = 0
    data: list[bytes] = []
    fields: dict[str, str] = {}
    seen = False
    newline = b"\n"
    for m in _LINE_END.finditer(block):
        line = block[line_start : m.start()]
        line_start = m.end()
        if line:
            if not seen:
                newline = m.group()
            seen = True
            if line.startswith(b":"):
                continue  # a comment
            name, colon, value = line.partition(b":")
            if colon and value.startswith(b" "):
                value = value[1:]
            if name == b"data":
                data.append(value)
            elif name in (b"event", b"id"):
                fields[name.decode()] = value.decode("utf-8", errors="replace")
            continue
        if seen:
            events.append(
                Event(
                    raw=block[start:line_start],
                    data=b"\n".join(data) if data else None,
                    event=fields.get("event"),
                    id=fields.get("id"),
                    newline=newline,
                )
            )
        start, data, fields, seen = line_start, [], {}, False
    return events


class EventTooLarge(ValueError):
    """An event (a line without its end, say) grew past the decoder's ``max_event_bytes``."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"an SSE event grew past {limit:,} bytes without ending")
        self.limit = limit


class SSEDecoder:
    """Incremental: feed chunks as they arrive; whole events come out, a partial one is held.

    Linear in the bytes fed, however they are cut: the held bytes are scanned once for line ends
    (each chunk resumes where the last scan stopped), and appended in place. Joining every chunk to
    the held bytes and scanning them all again made a long line without a newline quadratic. With
    ``max_event_bytes``, an event that grows past it (an upstream writing one endless line) raises
    :class:`EventTooLarge` instead of being held whole.
    """

    def __init__(self, max_event_bytes: int | None = None) -> None:
        self._buffer = bytearray()
        self._scanned = 0  # bytes of the buffer already searched for line ends
        self._line_start = 0  # where the line being read starts in the buffer
        self._max = max_event_bytes

    @property
    def pending(self) -> bytes:
        """Bytes of an event whose end has not arrived (yet)."""
        return bytes(self._buffer)

    def _complete(self, *, final: bool) -> int:
        """Scan the new bytes; how many leading bytes of the buffer are whole events."""
        buf, end = self._buffer, 0
        for m in _LINE_END.finditer(buf, self._scanned):
            if m.end() == len(buf) and m.group() == b"\r" and not final:
                self._scanned = m.start()  # perhaps the first half of a CRLF: look again later
                return end
            if m.start() == self._line_start:  # an empty line: the event before it is complete
                end = m.end()
            self._line_start = m.end()
        self._scanned = len(buf)
        return end

    def feed_raw(self, chunk: bytes) -> bytes:
        """The bytes of the events this chunk completes, unparsed (for byte-exact relays)."""
        self._buffer += chunk
        return self._take(self._complete(final=False))

    def _take(self, end: int) -> bytes:
        """The first ``end`` bytes out of the buffer (kept to the cap)."""
        out = bytes(self._buffer[:end]) if end else b""
        if end:
            del self._buffer[:end]
            self._scanned -= end
            self._line_start -= end
        if self._max is not None and len(self._buffer) > self._max:
            raise EventTooLarge(self._max)
        return out

    def feed(self, chunk: bytes) -> list[Event]:
        """The events this chunk completes."""
        return parse_events(self.feed_raw(chunk))

    def close(self) -> list[Event]:
        """At the end of the stream: the events a trailing CR completes. Whatever is still pending
        after that is an unfinished event (which SSE discards; a relay may pass it on as bytes)."""
        return parse_events(self._take(self._complete(final=True)))


def ends_done(last_block: bytes, pending: bytes = b"") -> bool:
    """Whether a stream whose last whole events were ``last_block`` (and ``pending``, bytes of an
    event never terminated) ended as an OpenAI stream ends: its last event with data is ``[DONE]``."""
    events = parse_events(last_block)
    if pending:
        events += parse_events(pending + b"\n\n")
    with_data = [e for e in events if e.data is not None]
    return bool(with_data) and with_data[-1].is_done


def first_data(chunk: bytes) -> bytes | None:
    """The data of the first whole event in ``chunk`` (e.g. a stream's first chunk), if any."""
    events = parse_events(chunk[: complete_length(chunk)])
    return events[0].data if events else None
