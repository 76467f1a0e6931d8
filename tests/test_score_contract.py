"""The scoring server's contract is one set of models: what the client sends the route accepts, and
what the route answers the client reads (kvproxy.scoring.contract)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kvproxy.backends.base import KVConfig
from kvproxy.config import KVCacheType as T
from kvproxy.scoring.contract import KVSpec, PromptFillSpec, ScoreAnswer, ScoreBody, ScoreInfo
from kvproxy.scoring.prompt_fill import PromptFill


def test_a_prompt_fill_crosses_the_wire_unchanged() -> None:
    fill = PromptFill(batch=64, ubatch=16, checkpoints=False, checkpoint_min_step=128).for_prompt([9, 3, 3])
    spec = ScoreBody.model_validate_json(
        ScoreBody(prompt_tokens=[1, 2], token_ids=[3], prompt_fill=PromptFillSpec.of(fill)).model_dump_json()
    ).prompt_fill
    assert spec is not None and spec.fill() == fill
    assert fill.user_starts == (3, 9)


def test_a_prompts_calls_cross_the_wire_unchanged() -> None:
    fill = PromptFill().for_prompt([24]).with_calls([(0, 24), (24, 42), (42, 50)])
    spec = ScoreBody.model_validate_json(
        ScoreBody(
            prompt_tokens=[1] * 50, token_ids=[3], prompt_fill=PromptFillSpec.of(fill)
        ).model_dump_json(),
    ).prompt_fill
    assert spec is not None and spec.calls == [(0, 24), (24, 42), (42, 50)]
    assert spec.fill() == fill and spec.fill().calls(50, cuts_apply=True) == [(0, 24), (24, 42), (42, 50)]
    assert PromptFillSpec.of(PromptFill()).calls is None  # derived by the scorer
    with pytest.raises(ValueError, match="do not cover"):
        PromptFillSpec(calls=[(0, 4), (5, 8)]).fill()


def test_the_request_is_strict_and_the_answers_are_lenient() -> None:
    with pytest.raises(ValidationError, match="extra"):
        ScoreBody.model_validate({"prompt_tokens": [1], "token_ids": [2], "temperature": 0})
    with pytest.raises(ValidationError):
        ScoreBody.model_validate({"prompt_tokens": [1], "token_ids": [-2]})
    # a server from before score paths and issue 27 sends neither score_path nor n_ubatch
    old = ScoreInfo.model_validate(
        {
            "score": True,
            "model": "m",
            "primary": {"cache_type_k": "q4_0", "cache_type_v": "q4_0"},
            "reference": {"cache_type_k": "f16", "cache_type_v": "f16"},
            "something_newer": 1,
        }
    )
    assert (old.score_path, old.n_ubatch) == ("prefill", None)
    assert old.primary.config() == KVConfig(T.Q4_0, T.Q4_0)
    assert KVSpec.of(KVConfig(T.Q8_0, T.F16)).model_dump(mode="json") == KVConfig(T.Q8_0, T.F16).as_dict()
    answer = ScoreAnswer.model_validate(
        {"kld": [0.1], "same_top": [True], "p_ref": [0.5], "p_primary": [0.4]}
    )
    assert answer.estimator == "exact" and answer.check_logprobs is None
