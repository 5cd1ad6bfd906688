"""The one line a step with nothing to train stops with: counts by kind, the first error of the environment or
of the scoring teacher (named), and the fix."""

from __future__ import annotations

from collections import Counter

from apprentice.config import Config
from apprentice.orchestrator.batch import empty_step_message


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
