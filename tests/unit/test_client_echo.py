"""Reading OpenAI's legacy completions scoring shape (`echo` + `logprobs`): one logprob per prompt token, the
generated token's entry dropped, and malformed answers refused with the reason."""

from __future__ import annotations

import pytest

from apprentice.clients.echo import parse_echo_logprobs


def body(token_logprobs: object) -> dict[str, object]:
    return {"choices": [{"text": "abc", "logprobs": {"tokens": ["a", "b", "c"], "token_logprobs": token_logprobs,
                                                     "top_logprobs": None, "text_offset": [0, 1, 2]}}]}  # fmt: skip


def test_prompt_logprobs_are_read_and_the_generated_token_dropped() -> None:
    scores = parse_echo_logprobs(body([None, -0.5, -2.25, -0.1]), 3)
    assert scores.logprobs == [None, -0.5, -2.25] and scores.token_ids is None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"choices": []}, "no 'choices'"),
        ({"choices": [{"text": "abc", "logprobs": None}]}, "does not echo scored prompts"),
        (body([None, -0.5]), "2 echoed token logprobs for a prompt of 3 tokens"),
        # a server that put a BOS before the ids scored a shifted sequence: every logprob would be one token off
        (body([None, -0.5, -2.25, -0.1, -0.3]), "5 echoed token logprobs for a prompt of 3 tokens .*BOS"),
        (body([None, "x", -1.0]), "not a logprob"),
        (body([None, 0.5, -1.0]), "not a logprob"),
        (body([None, float("nan"), -1.0]), "must be finite"),
    ],
)
def test_malformed_answers_are_refused(data: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_echo_logprobs(data, 3)
