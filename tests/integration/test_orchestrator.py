"""The orchestrator against a real, fault-injecting teacher on loopback, with the tiny student's tokenizer."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any

import pytest
from fault_teacher import Fault, FaultTeacher, reverse_last_user

from apprentice.config import Config
from apprentice.handoff.progress import write_trainer_progress
from apprentice.handoff.rollouts import latest_step_batch, read_step_batch, read_step_marker
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import run
from apprentice.testing.tiny import save_tiny_student

SECRET = "sk-orchestrator-test-4f1c9a"



@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")


def make_config(output: Path, student: Path, base_url: str, **orchestrator: Any) -> Config:
    orch = {
        "batch_size": 6, "use_token_client": False, "max_async_level": 100, "max_concurrency": 4,
        "rollout_model": {"base_url": base_url, "model": "teacher", "api_key_var": "TEACHER_KEY", "timeout_s": 2.0, "max_retries": 3},
        "sampling": {"max_tokens": 32},
        "env": [{"id": "reverse-text", "args": {"num_tasks": 40}}],
    }  # fmt: skip
    orch.update(orchestrator)
    return Config.model_validate({
        "output_dir": str(output), "model": {"name": str(student)}, "orchestrator": orch,
        "trainer": {"max_steps": 3, "loss": {"type": "sft"}, "num_processes": 2}, "log": {"progress": False},
    })  # fmt: skip


def all_bytes_under(path: Path) -> bytes:
    return b"".join(p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file())


def test_faults_lose_no_task_and_send_no_unknown_field(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def rule(index: int, body: dict[str, Any]) -> Fault | None:
        """Transient faults on each prompt's first attempt; a few prompts fail for good (empty / truncated)."""
        text = body["messages"][-1]["content"]
        bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 8
        with lock:
            attempts[text] = attempts.get(text, 0) + 1
            first = attempts[text] == 1
        transient = {0: Fault.rate_limit(retry_after=0.05), 1: Fault.server_error(), 2: Fault.drop(), 3: Fault.malformed(), 4: Fault.slow(3.0)}
        if first and bucket in transient:
            return transient[bucket]
        if bucket == 5:
            return Fault.empty()
        if bucket == 6:
            return Fault.truncated()
        return None

    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user, rule=rule) as teacher:
        cfg = make_config(output, student, teacher.base_url)
        asyncio.run(run(cfg))
        assert teacher.unknown_fields() == []
        assert teacher.token_fields() == []
        assert all(r.headers.get("authorization") == f"Bearer {SECRET}" for r in teacher.chat_requests())

    rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        # Every task of the step is either rendered into samples or counted as set aside, with a reason.
        assert row["rollout/trajectories"] == 6
        assert row["render/trajectories"] + row["render/set_aside"] + row["rollout/set_aside"] == 6
        reasons = {k: v for k, v in row.items() if k.startswith("rollout/set_aside/")}
        assert sum(reasons.values()) == row["rollout/set_aside"]
        assert set(reasons) <= {"rollout/set_aside/client/empty", "rollout/set_aside/truncated"}
    totals = {k: sum(r.get(k, 0.0) for r in rows) for k in ("teacher/retries", "teacher/truncated", "rollout/set_aside")}
    assert totals["teacher/retries"] > 0 and totals["rollout/set_aside"] > 0
    # Batches are split over the two trainer ranks; together they hold every kept trajectory's sample.
    for step in (1, 2, 3):
        samples = read_step_batch(output, step, 0) + read_step_batch(output, step, 1)
        assert len(samples) == rows[step - 1]["render/samples"]
        assert all(any(s.loss_mask) for s in samples)
    assert SECRET.encode() not in all_bytes_under(output)


def test_resume_reuses_cached_teacher_answers(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        cfg = make_config(output, student, teacher.base_url)
        asyncio.run(run(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": 2})})))
        paid = len(teacher.chat_requests())
        assert paid == 12
        # A crash after step 2's requests were answered but before its batch was written.
        import shutil

        shutil.rmtree(output / "rollouts" / "step_2")
        (output / "rollouts" / ".step_2.tmp-killed").mkdir()  # what a writer killed inside fsio.atomic_dir leaves
        assert latest_step_batch(output) == 1
        asyncio.run(run(cfg))
        assert not list((output / "rollouts").glob(".step_*")), "the orchestrator removes partial steps at its start"
        assert len(teacher.chat_requests()) == paid + 6, "step 2 must come from the cache; only step 3 is paid"
    rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # the redone step 2 is logged once, as redone
    # Step 2's own rollouts were all answered from the cache and paid nothing (teacher/requests counts the
    # requests sent since step 1 was written, which may include step 3's: the producer runs ahead).
    assert rows[1]["teacher/cache_hits"] == 6 and rows[1]["teacher/responses"] == 6
    assert rows[1]["teacher/usage/prompt_tokens"] == 0 and rows[1]["teacher/usage/completion_tokens"] == 0
    assert rows[2]["teacher/cache_hits"] == 0 and rows[2]["teacher/usage/completion_tokens"] > 0
    # The run's total is what the teacher reported for the 18 paid answers, persisted for the spend cap.
    usage = json.loads((output / "orchestrator" / "usage.json").read_text())
    assert usage["prompt_tokens"] == rows[2]["teacher/usage_total/prompt_tokens"] > 0
    marker = read_step_marker(output, 2)
    assert marker is not None


async def until(condition: Any, timeout_s: float = 60.0) -> None:
    """Poll `condition()` until it holds (a loaded CI machine may be slow; a wrong one never gets there)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.05)


def test_backpressure_waits_for_the_trainer(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEACHER_KEY", SECRET)
    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        cfg = make_config(output, student, teacher.base_url, max_async_level=0)

        async def drive() -> list[int]:
            task = asyncio.create_task(run(cfg))
            seen = []
            for trainer_step in range(3):
                # With max_async_level 0, step n is produced once the trainer finished step n-1, and no sooner.
                await until(lambda n=trainer_step: latest_step_batch(output) == n + 1)
                await asyncio.sleep(0.5)  # would be enough for the orchestrator to write one more step
                seen.append(latest_step_batch(output))
                write_trainer_progress(output, trainer_step + 1)
            await asyncio.wait_for(task, timeout=60)
            return seen

        assert asyncio.run(drive()) == [1, 2, 3]
    rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    # Steps 2 and 3 each opened only after the test's trainer stand-in moved on (>= 0.5 s later).
    assert rows[0]["perf/wait_trainer_s"] < 0.4 and all(r["perf/wait_trainer_s"] >= 0.4 for r in rows[1:])
    for row in rows:
        assert 0.0 <= row["teacher/inflight_mean"] <= 4.0 and row["teacher/inflight_busy"] == row["teacher/inflight_mean"] / 4
    assert rows[0]["teacher/inflight_mean"] > 0.0


def test_no_teacher_request_carries_logprob_or_token_fields_with_tools(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """tool-calculator through the endpoint: tool calls come back, are executed, and the episode renders."""
    monkeypatch.setenv("TEACHER_KEY", SECRET)

    def rule(index: int, body: dict[str, Any]) -> Fault | None:
        if body["messages"][-1]["role"] == "user":
            expression = re.search(r"[-\d(][\d\s+\-*/().]*\d\)?", body["messages"][-1]["content"])
            assert expression is not None
            return Fault.call_tool("calculator", {"expression": expression.group(0).strip()})
        return None

    def answer(body: dict[str, Any]) -> str:
        return f"The answer is {body['messages'][-1]['content']}."

    output = tmp_path / "out"
    with FaultTeacher(api_key=SECRET, respond=answer, rule=rule) as teacher:
        cfg = make_config(output, student, teacher.base_url, env=[{"id": "tool-calculator", "args": {"num_tasks": 20}}], batch_size=4)
        asyncio.run(run(cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"max_steps": 1})})))
        assert teacher.unknown_fields() == [] and teacher.token_fields() == []
        assert any(r.body and r.body.get("tools") for r in teacher.chat_requests())
    row = read_metrics(output / "orchestrator" / "metrics.jsonl")[0]
    assert row["render/samples"] >= 1
    assert row["rollout/tool-calculator/num_tool_calls"] >= 1


def test_a_step_with_nothing_to_train_stops_with_the_cause(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apprentice.inference.launch import free_port
    from apprentice.orchestrator.loop import NothingToTrainError

    monkeypatch.setenv("TEACHER_KEY", SECRET)
    down = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = make_config(tmp_path / "out", student, down)
    cfg.orchestrator.rollout_model = cfg.orchestrator.rollout_model.model_copy(update={"max_retries": 0})  # type: ignore[union-attr]
    with pytest.raises(NothingToTrainError) as info:
        asyncio.run(run(cfg))
    message = str(info.value)
    assert "step 1" in message and "client/connection" in message and down in message
    assert latest_step_batch(tmp_path / "out") == 0  # no empty batch was handed to the trainer

    with FaultTeacher(api_key=SECRET, respond=reverse_last_user, rule=lambda i, body: Fault.truncated()) as teacher:
        with pytest.raises(NothingToTrainError, match="max_tokens"):
            asyncio.run(run(make_config(tmp_path / "out2", student, teacher.base_url)))

    # The packing limit: every rendered sample is longer than a micro-batch. A runtime error (exit code 1).
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        cfg = make_config(tmp_path / "out3", student, teacher.base_url)
        cfg = cfg.model_copy(update={"trainer": cfg.trainer.model_copy(update={"micro_batch_tokens": 16})})
        with pytest.raises(NothingToTrainError, match="raise trainer.micro_batch_tokens") as too_long:
            asyncio.run(run(cfg))
    assert too_long.value.exit_code == 1 and "too_long" in str(too_long.value)


def test_spend_cap_stops_after_the_last_complete_step_and_resumes_when_raised(student: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from apprentice.orchestrator.spend import SpendCapReached

    monkeypatch.setenv("TEACHER_KEY", SECRET)
    output = tmp_path / "out"

    def capped(cfg: Config, max_tokens_total: int) -> Config:
        teacher = cfg.orchestrator.rollout_model.model_copy(update={"max_tokens_total": max_tokens_total})  # type: ignore[union-attr]
        return cfg.model_copy(update={"orchestrator": cfg.orchestrator.model_copy(update={"rollout_model": teacher})})

    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        # Step 1's six rollouts are all in flight at once (max_concurrency 6); the first answer exhausts the cap,
        # so step 1 completes and is written, and no request of step 2 is ever sent.
        cfg = make_config(output, student, teacher.base_url, max_concurrency=6)
        with pytest.raises(SpendCapReached) as info:
            asyncio.run(run(capped(cfg, 1)))
        assert "stopped after step 1" in str(info.value) and "max_tokens_total" in str(info.value)
        assert latest_step_batch(output) == 1 and len(teacher.chat_requests()) == 6
        paid = json.loads((output / "orchestrator" / "usage.json").read_text())
        assert paid["prompt_tokens"] > 0 and paid["completion_tokens"] > 0

        # The same cap again: nothing is sent, and the ledger is unchanged.
        with pytest.raises(SpendCapReached, match="nothing was sent"):
            asyncio.run(run(capped(cfg, 1)))
        assert len(teacher.chat_requests()) == 6

        # A raised cap resumes at step 2; the run's total keeps counting from where it was.
        asyncio.run(run(capped(cfg, 10**9)))
        assert latest_step_batch(output) == 3 and len(teacher.chat_requests()) == 18
    total = json.loads((output / "orchestrator" / "usage.json").read_text())
    rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert total["prompt_tokens"] == sum(r["teacher/usage/prompt_tokens"] for r in rows) > paid["prompt_tokens"]
    assert total["completion_tokens"] == rows[-1]["teacher/usage_total/completion_tokens"]


@pytest.mark.slow  # ~30 s: two real processes; tests/unit/test_launcher.py covers the launcher's part cheaply
def test_distill_exits_with_the_spend_cap_code_after_training_the_written_steps(student: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    from apprentice.handoff.progress import read_trainer_progress
    from apprentice.orchestrator.spend import EXIT_SPEND_CAP

    output = tmp_path / "out"
    with FaultTeacher(respond=reverse_last_user) as teacher:
        config = tmp_path / "distill.toml"
        config.write_text(f"""
output_dir = "{output}"
[model]
name = "{student}"
[orchestrator]
batch_size = 4
max_concurrency = 4
max_async_level = 1
use_token_client = false
[orchestrator.rollout_model]
base_url = "{teacher.base_url}"
model = "teacher"
max_tokens_total = 1
[[orchestrator.env]]
id = "reverse-text"
[trainer]
max_steps = 5
[trainer.loss]
type = "sft"
[log]
progress = false
""")
        env = os.environ | {"HF_HUB_OFFLINE": "1"}
        proc = subprocess.run([sys.executable, "-m", "apprentice", "distill", str(config)], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == EXIT_SPEND_CAP, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "spend cap" in proc.stderr and "Traceback" not in proc.stdout + proc.stderr
    assert latest_step_batch(output) == 1 and read_trainer_progress(output) == 1  # step 1 was trained, not lost
    # ...and kept: the trainer, told the orchestrator stopped after step 1, checkpointed it and exported final/
    # (it was killed waiting for step 2, so a user at the end of a budget had no model and lost the steps since
    # the last checkpoint interval).
    assert (output / "checkpoints" / "step_1" / "COMPLETE").is_file()
    assert json.loads((output / "final" / "config.json").read_text())["model_type"]
    assert "the orchestrator stopped after step 1 (teacher spend cap)" in proc.stdout + proc.stderr
