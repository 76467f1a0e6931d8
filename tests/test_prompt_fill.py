"""kvproxy.scoring.prompt_fill: llama-server's prompt calls, as its prompt-batch loop makes them
(tools/server/server-context.cpp); tests/test_message_spans.py checks them against a real one."""

from __future__ import annotations

import itertools

import pytest

from kvproxy.scoring.prompt_fill import PromptFill


def test_without_message_starts_only_the_tail_is_cut() -> None:
    assert PromptFill().calls(86, cuts_apply=True) == [(0, 82), (82, 86)]
    assert PromptFill().calls(1000, cuts_apply=True) == [(0, 484), (484, 996), (996, 1000)]
    assert PromptFill().calls(3000, cuts_apply=True) == [(0, 2048), (2048, 2484), (2484, 2996), (2996, 3000)]


def test_no_cuts_where_no_checkpoints_are_taken() -> None:
    fill = PromptFill().for_prompt([19, 59])
    assert fill.calls(86, cuts_apply=False) == [(0, 86)]  # no sliding window, or --swa-full
    assert PromptFill(checkpoints=False).for_prompt([19]).calls(3000, cuts_apply=True) == [
        (0, 2048),
        (2048, 3000),
    ]


def test_a_chat_is_cut_at_its_user_starts() -> None:
    """system, user, assistant, user as llama-server's log showed it (ChatML on Gemma 3)."""
    assert PromptFill().for_prompt([19, 59]).calls(86, cuts_apply=True) == [
        (0, 19),
        (19, 59),
        (59, 82),
        (82, 86),
    ]


def test_an_earlier_user_start_is_cut_only_before_the_first_checkpoint() -> None:
    """The first user start is cut (no checkpoint yet) and a checkpoint is saved before the call it
    starts; the middle one is then within the minimum spacing; the last one is always cut."""
    fill = PromptFill().for_prompt([30, 400, 800])
    assert fill.calls(900, cuts_apply=True) == [(0, 30), (30, 384), (384, 800), (800, 896), (896, 900)]
    spaced = PromptFill(checkpoint_min_step=300).for_prompt([30, 400, 800])
    assert spaced.calls(900, cuts_apply=True) == [
        (0, 30),
        (30, 384),
        (384, 400),
        (400, 800),
        (800, 896),
        (896, 900),
    ]


def test_the_spacing_counts_from_the_newest_checkpoint() -> None:
    """A batch boundary that starts no user message saves no checkpoint (unless near the end), so the
    spacing counts from the last user start cut, not from the batch boundary."""
    fill = PromptFill(batch=64, ubatch=16, checkpoint_min_step=100).for_prompt([10, 90, 200, 300])
    calls = fill.calls(320, cuts_apply=True)
    assert calls == [
        (0, 10), (10, 74), (74, 138), (138, 200), (200, 264), (264, 300), (300, 316), (316, 320),
    ]  # fmt: skip
    # 90 is within 100 of the checkpoint at 10: no cut; 200 is past 110: cut, and a checkpoint there


def test_a_chat_that_opens_with_a_user_message_cuts_after_the_bos() -> None:
    assert PromptFill().for_prompt([1, 40]).calls(60, cuts_apply=True) == [
        (0, 1),
        (1, 40),
        (40, 56),
        (56, 60),
    ]


def test_the_tail_cuts_follow_the_batch() -> None:
    """With ``-b 8`` the tail cuts are ``min(batch, ubatch + 4)`` = 8 and 4 tokens before the end."""
    fill = PromptFill(batch=8, ubatch=4).for_prompt([5])
    assert fill.calls(20, cuts_apply=True) == [(0, 5), (5, 12), (12, 16), (16, 20)]


@pytest.mark.parametrize("n", [1, 2, 4, 5, 17, 516, 517, 2100])
def test_the_calls_cover_the_prompt_in_order(n: int) -> None:
    for fill in (PromptFill(), PromptFill(batch=64, ubatch=16).for_prompt(range(1, n, 7))):
        calls = fill.calls(n, cuts_apply=True)
        assert calls[0][0] == 0 and calls[-1][1] == n
        assert all(a < b <= a + fill.batch for a, b in calls)
        assert all(b == c for (_, b), (c, _) in itertools.pairwise(calls))
        pieces = fill.pieces(n, cuts_apply=True)
        assert [p for p in pieces if p[1] - p[0] > fill.ubatch] == []


def test_pieces_split_each_call_from_its_start() -> None:
    fill = PromptFill().for_prompt([30])
    assert fill.pieces(1200, cuts_apply=True) == [(0, 30), (30, 542), (542, 684), (684, 1196), (1196, 1200)]


def test_user_starts_are_kept_sorted_and_once() -> None:
    assert PromptFill().for_prompt([59, 19, 59]).user_starts == (19, 59)
