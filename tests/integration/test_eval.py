"""`apprentice eval`: held-out reward of a local model directory (served for the occasion) or of an endpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fault_teacher import FaultTeacher, reverse_last_user

from apprentice.config import Config
from apprentice.eval import evaluate, format_table
from apprentice.testing.tiny import save_tiny_student


def config(output: Path, student: Path, base_url: str = "http://127.0.0.1:9/v1") -> Config:
    return Config.model_validate({
        "output_dir": str(output), "model": {"name": str(student)},
        "orchestrator": {
            "use_token_client": False, "rollout_model": {"base_url": base_url, "model": "teacher"},
            "sampling": {"temperature": 0.0, "max_tokens": 8},
            "env": [{"id": "reverse-text", "args": {"num_tasks": 12, "num_eval_tasks": 5}}],
        },
        "trainer": {"loss": {"type": "sft"}},
    })  # fmt: skip


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")


def test_eval_of_an_endpoint_scores_its_answers(student: Path, tmp_path: Path) -> None:
    with FaultTeacher(respond=reverse_last_user) as teacher:
        rows = evaluate(config(tmp_path, student, teacher.base_url), teacher.base_url)
        # Only held-out tasks are asked.
        asked = {r.body["messages"][-1]["content"] for r in teacher.chat_requests() if r.body}
    assert [(r.env, r.tasks, r.failed) for r in rows] == [("reverse-text", 5, 0)]
    assert rows[0].reward == pytest.approx(1.0)
    assert len(asked) == 5
    assert "reverse-text" in format_table(rows)


def test_eval_cli_serves_a_local_directory(student: Path, tmp_path: Path) -> None:
    cfg_path = tmp_path / "eval.toml"
    cfg_path.write_text(f"""
output_dir = "{tmp_path / 'out'}"
[model]
name = "{student}"
[orchestrator]
use_token_client = false
[orchestrator.rollout_model]
base_url = "http://127.0.0.1:9/v1"
model = "teacher"
[orchestrator.sampling]
temperature = 0.0
max_tokens = 8
[[orchestrator.env]]
id = "reverse-text"
args = {{ num_tasks = 12, num_eval_tasks = 4 }}
[trainer.loss]
type = "sft"
""")
    proc = subprocess.run([sys.executable, "-m", "apprentice", "eval", str(cfg_path), "--model", str(student)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    header, row = proc.stdout.strip().splitlines()[-2:]
    assert header.split() == ["environment", "tasks", "failed", "reward"]
    name, tasks, failed, reward = row.split()
    # An untrained random student answers, but it is not good at reversing text.
    assert (name, tasks, failed) == ("reverse-text", "4", "0") and 0.0 <= float(reward) < 0.5


def test_eval_rejects_a_model_that_is_neither_url_nor_directory(student: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an http"):
        evaluate(config(tmp_path, student), str(tmp_path / "missing"))


def test_eval_counts_bad_rewards_as_failed_tasks(student: Path, tmp_path: Path) -> None:
    """A reward function that raises, returns NaN or returns "0.5" fails that task (scored 0), not the evaluation."""
    data = config(tmp_path, student).model_dump()
    data["orchestrator"]["env"] = [{"id": "hostile_rewards:make_env", "args": {"kinds": ["raise", "nan", "str", "ok"]}}]
    cfg = Config.model_validate(data)
    with FaultTeacher(respond=lambda body: "aaaa") as teacher:
        rows = evaluate(cfg, teacher.base_url)
    assert [(r.env, r.tasks, r.failed) for r in rows] == [("hostile", 4, 3)]
    assert rows[0].reward == pytest.approx(1.0 / 4)  # "aaaa" scores 1.0 on the one good task


def test_eval_samples_as_the_held_out_evaluation_does_and_names_an_unreachable_url(student: Path, tmp_path: Path) -> None:
    """`apprentice eval` used the rollouts' sampling (here temperature 0.7) over every eval task, so its score of
    OUTPUT/final differed from rl's eval.jsonl; it now uses eval_temperature and eval_num_tasks. A URL nothing
    answers at is a UsageError naming it (was an httpx traceback)."""
    from apprentice.errors import UsageError

    with FaultTeacher(respond=reverse_last_user) as teacher:
        cfg = config(tmp_path, student, "http://127.0.0.1:9/v1")
        cfg.orchestrator.sampling.temperature = 0.7
        cfg.orchestrator.eval_num_tasks = 3
        rows = evaluate(cfg, teacher.base_url)  # not the config's rollout_model URL: its name is read from /models
        bodies = [r.body for r in teacher.chat_requests() if r.body]
    assert [(r.env, r.tasks) for r in rows] == [("reverse-text", 3)]
    assert len(bodies) == 3 and all(b["temperature"] == 0.0 for b in bodies)
    with pytest.raises(UsageError, match=r"--model http://127\.0\.0\.1:9/v1/x: could not read .*Connection refused"):
        evaluate(cfg, "http://127.0.0.1:9/v1/x")
