"""StopTextAssembler: whole characters out, stop sequences never leaked, whatever the chunking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvproxy.textstream import StopTextAssembler


def run(chunks: list[bytes], stop: list[str]) -> tuple[list[str], bool]:
    asm = StopTextAssembler(stop)
    out = [asm.push(c) for c in chunks]
    out.append(asm.flush())
    return out, asm.stopped


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


@given(
    text=st.text(), cuts=st.lists(st.integers(min_value=0), max_size=20), stop=st.text(min_size=1, max_size=5)
)
def test_output_is_the_text_cut_at_the_stop(text: str, cuts: list[int], stop: str) -> None:
    out, stopped = run(split(text.encode(), cuts), [stop])
    expected = text[: text.index(stop)] if stop in text else text
    assert "".join(out) == expected
    assert stopped == (stop in text)
    if stop in text:
        assert all(stop not in piece for piece in out)


@given(text=st.text(), cuts=st.lists(st.integers(min_value=0), max_size=20))
def test_without_stops_every_character_comes_out_whole(text: str, cuts: list[int]) -> None:
    out, stopped = run(split(text.encode(), cuts), [])
    assert "".join(out) == text and not stopped


def test_a_split_multibyte_character_waits_for_its_last_byte() -> None:
    asm = StopTextAssembler()
    euro = "€".encode()
    assert asm.push(euro[:1]) == ""
    assert asm.push(euro[1:]) == "€"


def test_a_possible_stop_prefix_is_held_then_released() -> None:
    asm = StopTextAssembler(["</end>"])
    assert asm.push(b"Hello </") == "Hello "
    assert asm.push(b"b> ok") == "</b> ok"
    assert asm.push(b" </en") == " "
    assert asm.push(b"d>tail") == ""
    assert asm.stopped and asm.flush() == ""


def test_the_earliest_stop_wins() -> None:
    asm = StopTextAssembler(["world", "lo"])
    assert asm.push(b"hello world") == "hel"


def test_invalid_utf8_becomes_replacement_characters() -> None:
    out, _ = run([b"ok \xff\xfe end"], [])
    assert "".join(out) == "ok \ufffd\ufffd end"
