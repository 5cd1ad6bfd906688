"""Token path: server ids used as returned, merged when a prompt extends the sample, logprobs carried through."""

from __future__ import annotations

import pytest

from apprentice.render import RenderError, render_trajectory
from apprentice.testing.tiny import build_tiny_tokenizer
from apprentice.types import TrainingSample


def step(prompt: list[int], completion: list[int], logprobs: list[float]) -> dict:
    tokens = {"prompt_ids": prompt, "completion_ids": completion, "completion_logprobs": logprobs}
    return {"prompt": [], "completion": [{"role": "assistant", "content": "ignored"}], "tokens": tokens}


def test_extending_steps_merge_with_env_tokens_masked() -> None:
    trajectory = {
        "steps": [
            step([1, 2, 3], [10, 11], [-0.1, -0.2]),
            step([1, 2, 3, 10, 11, 4, 5], [12], [-0.3]),  # tool result 4, 5 then the next completion
            step([1, 2, 3, 10, 11, 4, 5, 12], [13], [-0.4]),  # no env tokens in between
            step([7, 8], [14, 15], [-0.5, -0.6]),  # context rewritten: new sample
        ],
        "advantage": -0.75,
    }
    first, second = render_trajectory(trajectory, build_tiny_tokenizer())
    assert first == TrainingSample(
        token_ids=[1, 2, 3, 10, 11, 4, 5, 12, 13],
        loss_mask=[False, False, False, True, True, False, False, True, True],
        logprobs=[0.0, 0.0, 0.0, -0.1, -0.2, 0.0, 0.0, -0.3, -0.4],
        advantage=-0.75,
    )
    assert second == TrainingSample([7, 8, 14, 15], [False, False, True, True], [0.0, 0.0, -0.5, -0.6], -0.75)


def test_advantage_defaults_to_one_and_prompts_are_never_retokenized() -> None:
    # Ids that no tokenizer would produce from any text pass through untouched.
    (sample,) = render_trajectory({"steps": [step([499, 0, 499], [2], [-1.5])]}, build_tiny_tokenizer())
    assert sample.token_ids == [499, 0, 499, 2] and sample.advantage == 1.0


@pytest.mark.parametrize(
    ("tokens", "kind"),
    [
        ({"prompt_ids": [1], "completion_ids": [2, 3], "completion_logprobs": [-1.0]}, "bad_tokens"),
        ({"prompt_ids": [1], "completion_ids": [2]}, "bad_tokens"),
        ({"prompt_ids": [1], "completion_ids": [], "completion_logprobs": []}, "empty_mask"),
    ],
)
def test_malformed_tokens_are_typed_errors(tokens: dict, kind: str) -> None:
    trajectory = {"steps": [{"prompt": [], "completion": [], "tokens": tokens}]}
    with pytest.raises(RenderError) as err:
        render_trajectory(trajectory, build_tiny_tokenizer())
    assert err.value.kind == kind and "step 0" in err.value.message
