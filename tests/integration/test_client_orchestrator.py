"""A hostile teacher inside a real orchestrator run (tiny student tokenizer, loopback teacher): nothing crashes,
nothing broken is trained, set-asides are counted per kind, and refused credentials stop the run with exit 1."""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from fault_teacher import Fault, FaultTeacher, reverse_last_user

from apprentice import cli
from apprentice.clients.base import TeacherAuthError
from apprentice.config import Config
from apprentice.handoff.rollouts import latest_step_batch, read_step_batch
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import run
from apprentice.testing.tiny import save_tiny_student

SECRET = "sk-hostile-teacher-test-77aa"


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")


def config_dict(output: Path, student: Path, base_url: str, max_steps: int = 1, **orchestrator: Any) -> dict[str, Any]:
    orch = {
        "batch_size": 6, "use_token_client": False, "max_async_level": 100, "max_concurrency": 4,
        "rollout_model": {"base_url": base_url, "model": "teacher", "api_key_var": "HOSTILE_TEACHER_KEY", "timeout_s": 2.0, "max_retries": 1},
        "sampling": {"max_tokens": 64},
        "env": [{"id": "reverse-text", "args": {"num_tasks": 40}}],
    }  # fmt: skip
    orch.update(orchestrator)
    return {"output_dir": str(output), "model": {"name": str(student)}, "orchestrator": orch,
            "trainer": {"max_steps": max_steps, "loss": {"type": "sft"}}, "log": {"progress": False}}  # fmt: skip


def bucket(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest(), 16) % 3


def test_poisoned_answers_are_set_aside_per_kind_and_the_rest_trains(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTILE_TEACHER_KEY", SECRET)
    poison = {0: Fault.reply({"content": "ab\ud800cd"}), 1: Fault.reply(usage={"prompt_tokens": 3, "completion_tokens": 4076})}

    def rule(index: int, body: dict[str, Any]) -> Fault | None:
        return poison.get(bucket(body["messages"][-1]["content"]))

    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user, rule=rule) as teacher:
        asyncio.run(run(Config.model_validate(config_dict(output, student, teacher.base_url, batch_size=12))))
    (row,) = read_metrics(output / "orchestrator" / "metrics.jsonl")
    kinds = {k: v for k, v in row.items() if k.startswith("rollout/set_aside/")}
    assert kinds.keys() == {"rollout/set_aside/client/invalid_text", "rollout/set_aside/client/oversized"}
    assert row["teacher/errors/invalid_text"] == kinds["rollout/set_aside/client/invalid_text"] > 0
    assert row["teacher/errors/oversized"] == kinds["rollout/set_aside/client/oversized"] > 0
    assert row["teacher/usage/completion_tokens"] >= 4076  # what the set-aside answers cost is counted
    samples = read_step_batch(output, 1, 0)
    assert len(samples) == 12 - row["rollout/set_aside"] and latest_step_batch(output) == 1


def test_broken_tool_call_is_answered_by_the_env_and_set_aside(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """llama.cpp answers non-JSON tool arguments in the history with a 500; the wire copy makes them parseable."""
    monkeypatch.setenv("HOSTILE_TEACHER_KEY", SECRET)

    def rule(index: int, body: dict[str, Any]) -> Fault | None:
        last = body["messages"][-1]
        if last["role"] != "user":
            return None  # after the tool's answer: a plain text reply
        expression = re.search(r"[-\d(][\d\s+\-*/().]*\d\)?", last["content"])
        assert expression is not None
        if bucket(last["content"]) == 0:
            return Fault.call_tool("calculator", "{expression: " + expression.group(0))  # not JSON
        return Fault.call_tool("calculator", {"expression": expression.group(0).strip()})

    output = tmp_path / "out"
    env = [{"id": "tool-calculator", "args": {"num_tasks": 30}}]
    with FaultTeacher(api_key=SECRET, rule=rule, respond=lambda body: "The answer is 4.", provider="llama.cpp") as teacher:
        cfg = config_dict(output, student, teacher.base_url, env=env, sampling={"max_tokens": 64, "temperature": 1.0, "top_p": 1.0,
                                                                                 "extra_body": {"top_k": 0, "min_p": 0.0}})  # fmt: skip
        asyncio.run(run(Config.model_validate(cfg)))
        assert teacher.server_errors == []  # no "Failed to parse tool call arguments as JSON"
        tool_replies = [m["content"] for r in teacher.chat_requests() for m in (r.body or {})["messages"] if m["role"] == "tool"]
    assert any(reply.startswith("Error: the arguments of calculator are not valid JSON") for reply in tool_replies)
    (row,) = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert row["rollout/set_aside/invalid_tool_call"] >= 1 and "teacher/errors/unparseable_request" not in row
    assert row["rollout/set_aside"] == row["rollout/set_aside/invalid_tool_call"]
    # Every kept rollout is trained (a rollout may render to several samples: render/ splits where a prompt does
    # not extend the previous turn's tokens).
    assert row["render/trajectories"] == 6 - row["rollout/set_aside"] and len(read_step_batch(output, 1, 0)) >= 1


def test_a_401_mid_run_stops_with_exit_1_naming_the_variable(
    student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HOSTILE_TEACHER_KEY", SECRET)
    revoked = Fault("status", status=401, message=f"Incorrect API key provided: {SECRET}.")
    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user, rule=lambda i, body: revoked if i >= 6 else None) as teacher:
        with pytest.raises(TeacherAuthError):
            asyncio.run(run(Config.model_validate(config_dict(output, student, teacher.base_url, max_steps=3))))
        assert latest_step_batch(output) < 3  # stopped, not finished with rollouts set aside (steps run concurrently)

        config = tmp_path / "run.toml"
        config.write_text(tomli_w.dumps(config_dict(tmp_path / "out2", student, teacher.base_url, max_steps=3)))
        try:  # the orchestrator's main() exits with the error's code; cli.main returns it
            code = cli.main(["orchestrate", str(config)])
        except SystemExit as e:
            code = e.code
    assert code == 1
    said = capsys.readouterr().err + "\n".join(r.getMessage() for r in caplog.records)
    (line,) = [line for line in said.splitlines() if "refused the credentials" in line]
    assert "HOSTILE_TEACHER_KEY" in line and "HTTP 401" in line and SECRET not in said and "Traceback" not in said
