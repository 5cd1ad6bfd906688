"""The rl demo's environment: every dataset row parses, and the reward is 0.5 right city + 0.5 short."""

from __future__ import annotations

from pathlib import Path

import pytest

from apprentice.demo_rl import make_capitals_env, score_capital

DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo"


def test_every_country_parses_and_the_reward_is_graded() -> None:
    env = make_capitals_env(str(DEMO / "capitals-train.jsonl"), str(DEMO / "capitals-eval.jsonl"))
    assert len(env.tasks("train")) == 108 and len(env.tasks("eval")) == 40
    benin = next(t for t in env.tasks("train") if "Benin" in t.prompt[0]["content"])
    cases = {
        "Porto-Novo": 1.0,                                      # right and short
        "porto novo.": 1.0,                                     # spelling variants, case
        "The capital of Benin is Porto-Novo, on the coast.": 0.5,  # right but a sentence
        "Cotonou": 0.5,                                         # short but wrong
        "The capital of Benin is Cotonou.": 0.0,
        "": 0.0,
    }  # fmt: skip
    for text, reward in cases.items():
        assert score_capital(text, benin)[0] == pytest.approx(reward), text
