"""Environments whose reward functions misbehave, for tests (imported by `[[orchestrator.env]] id`).

`make_env(kinds=...)`: one task per kind; a task's reward function raises ("raise"), returns NaN ("nan"), +inf
("inf"), the string "0.5" ("str"), or scores normally ("ok": the share of "a" in the answer, as
apprentice.testing.letters does).
"""

from __future__ import annotations

from typing import Any

from apprentice.envs.base import Task
from apprentice.envs.single_turn import SingleTurnEnv


def score(text: str, task: Task) -> tuple[Any, dict[str, float]]:
    kind = task.info["kind"]
    if kind == "raise":
        raise ValueError(f"cannot parse the answer {text[:10]!r}")
    value = {"nan": float("nan"), "inf": float("inf"), "str": "0.5"}.get(kind)
    if value is not None:
        return value, {}
    return (sum(c == "a" for c in text) / len(text) if text else 0.0), {}


def make_env(kinds: list[str]) -> SingleTurnEnv:
    tasks = [Task(id=f"{kind}-{i}", prompt=[{"role": "user", "content": f"Say something about {i}."}], info={"kind": kind})
             for i, kind in enumerate(kinds)]  # fmt: skip
    return SingleTurnEnv("hostile", tasks, tasks, score)  # the same tasks held out too (apprentice eval)
