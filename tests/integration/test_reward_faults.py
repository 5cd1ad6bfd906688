"""Rewards that are not finite real numbers, and reward functions that raise, in an rl run for real: the rl
orchestrator against the built-in server on loopback (token path), the tiny student, group advantages.

Each bad sample is set aside with its kind counted (`rollout/set_aside/reward_*`), its first message logged once
per kind and environment; the others are trained on; nothing non-finite reaches `rollouts/`. A step with nothing
else stops with one line giving the counts, the first error and the fix."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fault_teacher import serve_asgi
from starlette.types import Receive, Scope, Send

from apprentice.config import Config, load_config
from apprentice.envs.reward_check import RewardError, checked_reward
from apprentice.handoff.rollouts import read_step_batch, step_dir
from apprentice.inference.server import build_app
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import NothingToTrainError
from apprentice.orchestrator.loop import run as orchestrate
from apprentice.testing.tiny import save_tiny_student


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    student = save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")
    with serve_asgi(build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)) as base_url:
        yield student, base_url


def rl_config(tmp_path: Path, student: Path, base_url: str, kinds: list[str], extra: str = "") -> Config:
    path = tmp_path / "rl.toml"
    path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "{student}"
[orchestrator]
batch_size = {2 * len(kinds)}
rollouts_per_prompt = 2
[orchestrator.student_endpoint]
base_url = "{base_url}"
model = "student"
max_retries = 0
[orchestrator.sampling]
max_tokens = 6
[[orchestrator.env]]
id = "hostile_rewards:make_env"
args = {{ kinds = {json.dumps(kinds)} }}
[trainer]
max_steps = 1
[log]
progress = false
{extra}""")
    return load_config([path])


def test_bad_rewards_are_set_aside_by_kind_and_the_rest_is_trained(
    server: tuple[Path, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    student, base_url = server
    cfg = rl_config(tmp_path, student, base_url, ["raise", "nan", "inf", "str", "ok"])
    with caplog.at_level(logging.WARNING, logger="apprentice.orchestrator"):
        asyncio.run(orchestrate(cfg))
    row = read_metrics(Path(cfg.output_dir) / "orchestrator" / "metrics.jsonl")[0]
    assert {k: row[k] for k in row if k.startswith("rollout/set_aside/")} == {
        "rollout/set_aside/reward_error": 2.0, "rollout/set_aside/reward_nan": 2.0,
        "rollout/set_aside/reward_inf": 2.0, "rollout/set_aside/reward_type": 2.0,
    }  # fmt: skip
    assert math.isfinite(row["rollout/reward"])
    samples = read_step_batch(Path(cfg.output_dir), 1, 0)
    assert len(samples) == 2  # the "ok" group only
    for s in samples:
        assert math.isfinite(s.advantage) and all(math.isfinite(x) for x in s.logprobs)
    raw = b"".join(p.read_bytes() for p in step_dir(Path(cfg.output_dir), 1).iterdir())
    assert b"NaN" not in raw and b"Infinity" not in raw
    # One line per kind and environment (two samples each), the reward function's own message and where it raised.
    logged = [r.getMessage() for r in caplog.records if "rollout set aside" in r.getMessage()]
    assert len(logged) == 4 and all("\n" not in m for m in logged)
    raised = next(m for m in logged if "(reward_error)" in m)
    assert "ValueError: cannot parse the answer" in raised and "hostile_rewards.py:" in raised
    assert any("returned '0.5' (str)" in m for m in logged)


@pytest.mark.parametrize(
    ("kind", "counted", "says"),
    [
        ("raise", "reward_error 4", "ValueError: cannot parse the answer"),
        ("nan", "reward_nan 4", "the reward of environment 'hostile' returned NaN"),
        ("str", "reward_type 4", "returned '0.5' (str); a reward must be a real number"),
    ],
)
def test_a_step_of_bad_rewards_stops_with_one_line(
    server: tuple[Path, str], tmp_path: Path, kind: str, counted: str, says: str
) -> None:
    student, base_url = server
    cfg = rl_config(tmp_path, student, base_url, [kind, kind])
    with pytest.raises(NothingToTrainError) as err:
        asyncio.run(orchestrate(cfg))
    message = str(err.value)
    assert message.startswith("step 1: none of the 4 rollouts could be trained on")
    assert f"(set aside: {counted})" in message and says in message and "\n" not in message
    assert "Fix: fix the environment's reward function" in message
    assert not step_dir(Path(cfg.output_dir), 1).exists()


def test_checked_reward_accepts_real_numbers_only() -> None:
    import numpy as np

    assert checked_reward(True) == 1.0 and checked_reward(3) == 3.0 and checked_reward(np.float32(0.25)) == 0.25
    for value, kind in (("0.5", "reward_type"), (None, "reward_type"), ([1.0], "reward_type"), (b"1", "reward_type"),
                        (float("nan"), "reward_nan"), (np.float64("nan"), "reward_nan"), (-math.inf, "reward_inf"),
                        (10**400, "reward_inf")):  # fmt: skip
        with pytest.raises(RewardError) as err:
            checked_reward(value)
        assert err.value.kind == kind


def test_a_scoring_teacher_that_fails_every_sample_is_named_with_counts(server: tuple[Path, str], tmp_path: Path) -> None:
    """On-policy distillation whose teacher answers the startup probe, then HTTP 500 for good: the step stops with
    the set-aside counts (distill/<kind>), the teacher's URL and its own error text, not "(set aside: {})"."""
    student, base_url = server
    real = build_app(student, dtype="float32", device="cpu", batch_window_s=0.0)
    seen = {"completions": 0}
    broken = FastAPI()

    @broken.post("/v1/completions")
    async def fail(request: Request) -> JSONResponse:
        return JSONResponse({"error": {"message": "teacher GPU fell off the bus", "type": "server_error"}}, status_code=500)

    async def teacher(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/v1/completions":
            seen["completions"] += 1
            if seen["completions"] > 2:  # the startup probe (ids, then the self-test's second scoring) is answered
                await broken(scope, receive, send)
                return
        await real(scope, receive, send)

    with serve_asgi(teacher) as teacher_url:
        extra = f'[orchestrator.teacher_model]\nbase_url = "{teacher_url}"\nmodel = "teacher"\nmax_retries = 0\n'
        cfg = rl_config(tmp_path, student, base_url, ["ok", "ok"], extra)
        with pytest.raises(NothingToTrainError) as err:
            asyncio.run(orchestrate(cfg))
    message = str(err.value)
    assert message.startswith("step 1: none of the 4 rollouts could be trained on (set aside: distill/"), message
    assert " 4)" in message and f"orchestrator.teacher_model ({teacher_url}, model 'teacher') failed" in message
    assert "teacher GPU fell off the bus" in message and f"check the scoring teacher at {teacher_url}" in message
    assert not step_dir(Path(cfg.output_dir), 1).exists()
