"""The one SSE codec: whole events out of any cut of the byte stream, with LF, CRLF or CR line ends,
comments and multi-line data, each event's exact bytes kept for byte-exact relays."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from kvproxy import sse

NEWLINES = [b"\n", b"\r\n", b"\r"]

payloads = st.lists(
    st.text(alphabet=st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=20),
    min_size=1,
    max_size=3,
)


def frame(lines: list[str], newline: bytes, comment: bool) -> bytes:
    out = b": keep-alive" + newline if comment else b""
    for line in lines:
        out += b"data: " + line.encode() + newline
    return out + newline


@given(
    events=st.lists(st.tuples(payloads, st.booleans()), min_size=1, max_size=6),
    newline=st.sampled_from(NEWLINES),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=8),
)
def test_any_cut_of_any_line_ending_gives_the_same_events(
    events: list[tuple[list[str], bool]], newline: bytes, cuts: list[int]
) -> None:
    stream = b"".join(frame(lines, newline, comment) for lines, comment in events)
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})
    decoder = sse.SSEDecoder()
    got: list[sse.Event] = []
    for a, b in itertools.pairwise(points):
        got.extend(decoder.feed(stream[a:b]))
    got.extend(decoder.close())
    assert [e.data for e in got] == ["\n".join(lines).encode() for lines, _ in events]
    assert b"".join(e.raw for e in got) == stream  # the exact bytes, for byte-exact relays
    assert all(e.newline == newline for e in got)
    assert decoder.pending == b""


def test_a_trailing_cr_waits_for_the_next_chunk() -> None:
    decoder = sse.SSEDecoder()
    assert decoder.feed(b"data: a\r\n\r") == []  # the blank line may still be a CRLF
    (event,) = decoder.feed(b"\n")
    assert event.data == b"a" and event.raw == b"data: a\r\n\r\n"
    assert decoder.feed(b"data: b\r\r") == []
    (event,) = decoder.feed(b"data: c")  # a lone CR it was: the event ended
    assert event.data == b"b" and decoder.pending == b"data: c"
    decoder = sse.SSEDecoder()
    assert decoder.feed(b"data: [DONE]\r\r") == []
    (done,) = decoder.close()  # the stream ended: the CR was a line end
    assert done.is_done and decoder.pending == b""


def test_fields_comments_and_the_space_after_the_colon() -> None:
    block = b": comment\nevent: delta\nid: 7\ndata:no-space\ndata:  two\n\n"
    (event,) = sse.SSEDecoder().feed(block)
    assert (event.event, event.id, event.data) == ("delta", "7", b"no-space\n two")
    # a comment-only block (a keep-alive) is no message, but a relay still passes its bytes on
    (ping,) = sse.SSEDecoder().feed(b": ping\n\n")
    assert ping.data is None and ping.raw == b": ping\n\n"


def test_raw_relay_cuts_at_event_boundaries_only() -> None:
    decoder = sse.SSEDecoder()
    assert decoder.feed_raw(b"data: 1\n\ndata: 2") == b"data: 1\n\n"
    assert decoder.feed_raw(b"\n") == b""
    assert decoder.feed_raw(b"\n") == b"data: 2\n\n"


def test_encode_and_done() -> None:
    assert sse.encode({"a": 1}) == b'data: {"a":1}\n\n'
    assert sse.encode(b"{}", newline=b"\r\n") == b"data: {}\r\n\r\n"
    (event,) = sse.SSEDecoder().feed(sse.DONE)
    assert event.is_done
    assert sse.first_data(b'data: {"id":"x"}\r\n\r\ndata: more') == b'{"id":"x"}'


def test_a_long_line_without_a_newline_decodes_in_linear_time() -> None:
    """Issue 25, finding 9: each chunk was joined to everything held and all of it scanned again,
    so a line of n bytes cost O(n^2) (a 16 MiB line in 1 KiB chunks: minutes)."""
    import time

    decoder = sse.SSEDecoder()
    piece = b"x" * 1024
    start = time.perf_counter()
    assert decoder.feed(b"data: ") == []
    for _ in range(16 * 1024):  # 16 MiB
        assert decoder.feed_raw(piece) == b""
        assert time.perf_counter() - start < 5, "quadratic: still feeding after 5 s"
    (event,) = decoder.feed(b"\n\n")
    assert len(event.data or b"") == 16 << 20 and decoder.pending == b""
    assert time.perf_counter() - start < 5


def test_an_event_past_the_cap_is_refused_not_held() -> None:
    decoder = sse.SSEDecoder(max_event_bytes=1 << 20)
    assert decoder.feed(b"data: 1\n\n")[0].data == b"1"  # whole events never count against it
    fed = 0
    try:
        while True:
            decoder.feed_raw(b"y" * 4096)
            fed += 4096
            assert fed <= (1 << 20) + 4096
    except sse.EventTooLarge as exc:
        assert exc.limit == 1 << 20
    assert (1 << 20) < fed + 4096 <= (1 << 20) + 4096
    # CR-framed events are cut as before under a cap
    decoder = sse.SSEDecoder(max_event_bytes=64)
    assert [e.data for e in decoder.feed(b"data: a\r\rdata: b\r")] == [b"a"]
    assert decoder.feed(b"\r") == []  # the last CR may still be half a CRLF
    assert [e.data for e in decoder.close()] == [b"b"]


def test_a_stream_ends_done_when_its_last_event_with_data_is_done() -> None:
    """How the llama-server relay tells a finished stream from one cut short (kvproxy.upstream)."""
    for nl in (b"\n", b"\r\n", b"\r"):
        done = b"data: [DONE]" + nl + nl
        chunk = b'data: {"choices": []}' + nl + nl
        assert sse.ends_done(chunk + done)
        assert sse.ends_done(done + b": keep-alive" + nl + nl)  # a comment after it changes nothing
        assert not sse.ends_done(chunk)
        assert not sse.ends_done(done + chunk)  # more data after [DONE]: not an OpenAI end
        assert sse.ends_done(chunk, pending=b"data: [DONE]")  # its blank line never came
    assert not sse.ends_done(b"")
    assert not sse.ends_done(b'data: {"text": "[DONE]"}\n\n')  # the marker inside data is no end
