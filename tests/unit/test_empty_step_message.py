"""The one line a step with nothing to train stops with: counts by kind, the first error of the environment or
of the scoring teacher (named), and the fix."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from apprentice.config import Config
from apprentice.orchestrator.batch import NothingToTrainError, empty_step_message, rollout_metrics


def rl_config(**orchestrator: object) -> Config:
    return Config.model_validate({"model": {"name": "student"}, "inference": {}, "orchestrator": orchestrator})


def test_scoring_teacher_failures_are_counted_and_the_teacher_named() -> None:
    cfg = rl_config(teacher_model={"base_url": "http://127.0.0.1:9/v1", "model": "big-teacher"})
    trajectories = [{"env": "letters", "task_id": str(i), "error": None} for i in range(4)]
    stats = {"render/samples": 4.0, "distill/set_aside/server_error": 3.0, "distill/set_aside/bad_response": 1.0}
    errors = {"server_error": "HTTP 500 after 3 attempts: upstream overloaded", "bad_response": "NaN logprob at 7"}
    message = empty_step_message(5, trajectories, Counter(), stats, cfg, errors)  # type: ignore[arg-type]
    assert message.startswith("step 5: none of the 4 rollouts could be trained on")
    assert "(set aside: distill/bad_response 1, distill/server_error 3)" in message
    assert "orchestrator.teacher_model (http://127.0.0.1:9/v1, model 'big-teacher') failed (server_error): HTTP 500" in message
    assert "check the scoring teacher at http://127.0.0.1:9/v1" in message and "\n" not in message


def test_environment_errors_and_render_set_asides_are_counted_together() -> None:
    cfg = rl_config()
    trajectories = [
        {"env": "calc", "task_id": "1", "error": "client/timeout", "error_message": "read timeout after 30 s"},
        {"env": "calc", "task_id": "2", "error": "reward_error", "error_message": "reward function raised KeyError: 'x'"},
        {"env": "calc", "task_id": "3", "error": None},
    ]
    dropped = Counter({"client/timeout": 1, "reward_error": 1})
    message = empty_step_message(1, trajectories, dropped, {"render/set_aside/empty_turn": 1.0}, cfg)  # type: ignore[arg-type]
    assert "(set aside: client/timeout 1, reward_error 1, set_aside/empty_turn 1)" in message
    assert "first error: client/timeout in environment 'calc': read timeout after 30 s" in message
    assert "the inference server is up" in message and "fix the environment's reward function" in message


def test_rl_rollouts_whose_steps_lack_the_servers_tokens_are_set_aside_with_the_fix(tmp_path: Path) -> None:
    """A user environment that builds its steps itself (no `make_step`) gives steps without token ids: rendered
    from text they were trained with zero inference logprobs and advantage 1 whatever their reward. rl mode sets
    them aside ("no_tokens"); an environment metric that is not a number is counted, not averaged, not a crash."""
    from apprentice.orchestrator.loop import write_step
    from apprentice.orchestrator.metered import StepAccount
    from apprentice.orchestrator.producer import StepRollouts
    from apprentice.testing.tiny import save_tiny_student
    from apprentice.tokenizer import load_tokenizer

    student = save_tiny_student(tmp_path / "student")
    cfg = Config.model_validate({"model": {"name": str(student)}, "inference": {}, "output_dir": str(tmp_path / "out"),
                                 "orchestrator": {"batch_size": 2, "rollouts_per_prompt": 2}})  # fmt: skip
    step = {"prompt": [{"role": "user", "content": "Reverse: ab"}], "completion": [{"role": "assistant", "content": "ba"}]}
    trajectories = [{"env": "mine", "task_id": "0", "error": None, "steps": [step], "reward": r, "truncated": False,
                     "metrics": {"first_a": None, "length": 2.0}} for r in (0.0, 1.0)]  # fmt: skip
    done = StepRollouts(1, [], trajectories, StepAccount(), 0.0, 0.0)  # type: ignore[arg-type]
    with pytest.raises(NothingToTrainError) as info:
        write_step(cfg, load_tokenizer(cfg.model), done)
    message = str(info.value)
    assert "(set aside: no_tokens 2)" in message and "make_step(prompt, completion, response)" in message
    assert not (tmp_path / "out" / "rollouts" / "step_1").exists()
    metrics = rollout_metrics(trajectories, Counter())  # type: ignore[arg-type]
    assert metrics["rollout/mine/length"] == 2.0 and metrics["rollout/mine/first_a/not_a_number"] == 2.0
    assert "rollout/mine/first_a" not in metrics
