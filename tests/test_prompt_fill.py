"""kvproxy.scoring.prompt_fill: llama-server's prompt calls, as its prompt-batch loop makes them
(tools/server/server-context.cpp); tests/test_message_spans.py checks them against a real one."""

from __future__ import annotations

import itertools

import pytest

from kvproxy.scoring.cached_prefix import Prompt, replay_calls
from kvproxy.scoring.prompt_fill import Filled, PromptFill, common_prefix, restored_prefix


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


# ---- a prompt that starts from a cached prefix (llama-server's cache_prompt) ---------------------------
# The worked example of docs/production.md ("A cached prefix"), as llama-server -lv 4 logged it on the
# bundled Gemma 3 (ChatML): turn 1 (system, user) of 47 tokens, its second turn of 105 tokens.
TURN1 = Prompt(tuple(range(47)), (24,))
TURN2 = Prompt(tuple(range(105)), (24, 69))


def test_a_first_turn_leaves_checkpoints_at_its_last_user_start_and_before_its_tail() -> None:
    filled = PromptFill().for_prompt(TURN1.user_starts).fill(TURN1.n, cuts_apply=True)
    assert filled == Filled(((0, 24), (24, 43), (43, 47)), (24, 43))
    assert filled.calls == tuple(PromptFill().for_prompt([24]).calls(47, cuts_apply=True))


def test_the_second_turn_reuses_the_first_turns_last_checkpoint_less_one() -> None:
    first = PromptFill().for_prompt([24]).fill(47, cuts_apply=True)
    assert restored_prefix(first, common_prefix(TURN1.tokens, TURN2.tokens), TURN2.n) == 42
    second = PromptFill().for_prompt(TURN2.user_starts).after(first, TURN2.n, 42)
    assert second.calls == ((0, 24), (24, 42), (42, 69), (69, 101), (101, 105))
    assert replay_calls(PromptFill(), [TURN1], TURN2, 42) == second.calls
    # what kvproxy replayed before: the prompt from nothing
    assert replay_calls(PromptFill(), [TURN1], TURN2, 0) == ((0, 24), (24, 69), (69, 101), (101, 105))


def test_a_restore_takes_the_newest_checkpoint_at_or_before_the_common_prefix() -> None:
    first = Filled(((0, 24), (24, 43), (43, 47)), (24, 43))
    assert restored_prefix(first, 47, 105) == 42
    assert restored_prefix(first, 42, 105) == 42  # the checkpoint's last position is 42
    assert restored_prefix(first, 41, 105) == 23  # the one at 24 then
    assert restored_prefix(first, 22, 105) == 0  # none: the whole prompt again
    assert restored_prefix(first, 0, 105) == 0
    assert restored_prefix(Filled(((0, 1),), (1,)), 1, 60) == 1  # a checkpoint at 1 keeps the BOS
    assert restored_prefix(first, 47, 43) == 42  # at least one token is computed


def test_the_restored_checkpoint_survives_and_spaces_the_next_cuts() -> None:
    """After a restore an earlier user start past it is no cut (a checkpoint exists), the last one is."""
    first = PromptFill().for_prompt([24]).fill(47, cuts_apply=True)
    third = PromptFill().for_prompt([24, 69, 120]).after(first, 140, 42)
    assert third.calls == ((0, 24), (24, 42), (42, 120), (120, 136), (136, 140))
    assert third.checkpoints == (24, 43, 42, 120, 136)
    # with a spacing that the user start at 69 exceeds, it is cut again
    spaced = PromptFill(checkpoint_min_step=20).for_prompt([24, 69, 120]).after(first, 140, 42)
    assert spaced.calls[:4] == ((0, 24), (24, 42), (42, 69), (69, 120))


def test_a_third_turn_continues_the_second_as_it_was_computed() -> None:
    """Each earlier turn is assumed computed after the one before: the third turn's prefix holds the
    second turn's calls, not those of the second turn from nothing."""
    turn3 = Prompt(tuple(range(160)), (24, 69, 130))
    fill = PromptFill()
    second = fill.for_prompt(TURN2.user_starts).after(
        fill.for_prompt([24]).fill(47, cuts_apply=True), 105, 42
    )
    assert restored_prefix(second, 105, 160) == 100
    calls = replay_calls(fill, [TURN1, TURN2], turn3, 100)
    assert calls == ((0, 24), (24, 42), (42, 69), (69, 100), (100, 130), (130, 156), (156, 160))
    assert replay_calls(fill, [TURN2], turn3, 100) != calls  # the second turn from nothing


def test_a_cache_n_that_no_guess_predicts_is_not_replayable() -> None:
    fill = PromptFill()
    assert replay_calls(fill, [TURN1], TURN2, 41) is None
    assert replay_calls(fill, [], TURN2, 23) is None  # another chat with the same system message
    # a conversation whose earlier turn was edited: the common prefix ends inside turn 1
    edited = Prompt((*range(30), *range(1000, 1075)), (24, 69))
    assert replay_calls(fill, [TURN1], edited, 42) is None
    # ... and one whose reported prefix is turn 1's checkpoint at its user start less one
    assert replay_calls(fill, [TURN1], edited, 23) == ((0, 23), (23, 69), (69, 101), (101, 105))


def test_a_resent_prompt_and_a_shared_bos_are_replayable() -> None:
    fill = PromptFill()
    # the same prompt again: its own last checkpoint (4 before its end) less one
    assert replay_calls(fill, [], TURN2, 100) == ((0, 24), (24, 69), (69, 100), (100, 101), (101, 105))
    # a chat that opens with a user message after another that did: only the checkpoint at 1
    opened = Prompt(tuple(range(60)), (1, 40))
    assert replay_calls(fill, [], opened, 1) == ((0, 1), (1, 40), (40, 56), (56, 60))
    assert replay_calls(fill, [], Prompt(tuple(range(60)), (40,)), 1) == ((0, 1), (1, 40), (40, 56), (56, 60))


def test_without_message_starts_only_the_tail_cuts_and_checkpoints_remain() -> None:
    """--no-jinja (or a raw prompt): the same logic with the 4 + n_ubatch and 4 cuts only."""
    first = PromptFill().fill(47, cuts_apply=True)
    assert first == Filled(((0, 43), (43, 47)), (43,))
    assert replay_calls(PromptFill(), [Prompt(tuple(range(47)))], Prompt(tuple(range(105))), 42) == (
        (0, 42),
        (42, 101),
        (101, 105),
    )


def test_given_calls_are_the_calls() -> None:
    fill = PromptFill().for_prompt([24]).with_calls([(0, 24), (24, 42), (42, 50)])
    assert fill.calls(50, cuts_apply=True) == [(0, 24), (24, 42), (42, 50)]
    assert fill.pieces(50, cuts_apply=False) == [(0, 24), (24, 42), (42, 50)]
    assert PromptFill(ubatch=16).with_calls([(0, 40)]).pieces(40, cuts_apply=True) == [
        (0, 16),
        (16, 32),
        (32, 40),
    ]
    with pytest.raises(ValueError, match="do not cover"):
        fill.calls(51, cuts_apply=True)
    for bad in ([], [(0, 5), (6, 8)], [(0, 5), (5, 5), (5, 8)], [(1, 8)]):
        with pytest.raises(ValueError, match="do not cover"):
            PromptFill().with_calls(bad)
    assert fill.for_prompt([3]).given is None  # another prompt: its own calls


@pytest.mark.parametrize("value", [True, -3, "42", 4.0, None])
def test_a_cache_n_that_is_not_a_count_is_ignored(value: object) -> None:
    """``timings.cache_n`` is upstream bytes: only a non-negative integer is read as a count."""
    from kvproxy.scoring.job import PrimaryReport

    report = PrimaryReport()
    report.note_end({"timings": {"cache_n": value, "predicted_n": 3}})
    assert report.cache_n is None and report.predicted_n == 3
    report.note_end({"timings": {"cache_n": 42}})
    assert report.cache_n == 42
