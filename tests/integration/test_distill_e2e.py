"""`apprentice distill` for real: launcher + orchestrator + trainer processes against a fault-injecting teacher.

The teacher is the one thing a test cannot reach (a hosted API), so a strict loopback server stands in for it:
it rejects any request field outside the chat-completions schema and injects 429s, 500s, dropped connections
and malformed bodies. Everything else is the real thing: subprocesses, the tiny student, torch training.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fault_teacher import Fault, FaultTeacher, reverse_last_user

from apprentice.metrics import read_metrics
from apprentice.testing.tiny import save_tiny_student

SECRET = "sk-e2e-distill-9b7d2c"



def transient_faults() -> Any:
    """The first attempt of some prompts fails in a retryable way; a few prompts are truncated for good."""
    attempts: dict[str, int] = {}
    lock = threading.Lock()

    def rule(index: int, body: dict[str, Any]) -> Fault | None:
        text = body["messages"][-1]["content"]
        bucket = int(hashlib.sha256(text.encode()).hexdigest(), 16) % 10
        with lock:
            attempts[text] = attempts.get(text, 0) + 1
            first = attempts[text] == 1
        faults = {0: Fault.rate_limit(retry_after=0.05), 1: Fault.server_error(502), 2: Fault.drop(), 3: Fault.malformed()}
        if first and bucket in faults:
            return faults[bucket]
        return Fault.truncated() if bucket == 4 else None

    return rule


def write_config(path: Path, output: Path, student: Path, base_url: str, max_steps: int, *, num_processes: int = 1, micro_batch_tokens: int = 512) -> Path:
    path.write_text(f"""
output_dir = "{output}"
[model]
name = "{student}"
[orchestrator]
batch_size = 4
max_async_level = 1
use_token_client = false
[orchestrator.rollout_model]
base_url = "{base_url}"
model = "teacher"
api_key_var = "E2E_TEACHER_KEY"
timeout_s = 5
max_retries = 4
[orchestrator.sampling]
max_tokens = 32
[[orchestrator.env]]
id = "reverse-text"
args = {{ num_tasks = 200 }}
[trainer]
max_steps = {max_steps}
micro_batch_tokens = {micro_batch_tokens}
num_processes = {num_processes}
[trainer.loss]
type = "sft"
[trainer.optim]
lr = 3e-3
[trainer.ckpt]
interval = 2
keep = 2
[log]
progress = false
""")
    return path


def env_with_key() -> dict[str, str]:
    return {**os.environ, "E2E_TEACHER_KEY": SECRET, "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student") / "tiny")


def assert_no_secret(output: Path) -> None:
    for path in output.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), f"the API key leaked into {path}"


def test_distill_runs_end_to_end_against_a_faulty_teacher(student: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    output = tmp_path / "run"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user, rule=transient_faults()) as teacher:
        # Two trainer ranks: the launcher starts the trainer under torchrun (gloo on CPU).
        config = write_config(tmp_path / "distill.toml", output, student, teacher.base_url, max_steps=4, num_processes=2)
        proc = subprocess.run([sys.executable, "-m", "apprentice", "distill", str(config)], env=env_with_key(), capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert teacher.unknown_fields() == [] and teacher.token_fields() == []
    assert "[orchestrator]" in proc.stdout and "[trainer]" in proc.stdout
    assert (output / "config.toml").is_file()
    assert sorted(p.name for p in (output / "rollouts").iterdir()) == [f"step_{n}" for n in range(1, 5)]
    trainer_rows = read_metrics(output / "trainer" / "metrics.jsonl")
    assert [r["step"] for r in trainer_rows] == [1, 2, 3, 4]
    assert all("loss/nll" in r and "lr" in r and "grad_norm" in r for r in trainer_rows)
    orchestrator_rows = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert sum(r["teacher/retries"] for r in orchestrator_rows) > 0
    for row in orchestrator_rows:
        assert row["render/trajectories"] + row["render/set_aside"] + row["rollout/set_aside"] == 4  # no task lost
    model = AutoModelForCausalLM.from_pretrained(output / "final")
    assert model.config.vocab_size > 0 and (output / "final" / "tokenizer_config.json").is_file()
    assert_no_secret(output)


def test_kill_9_then_rerun_resumes_without_paying_twice(student: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        config = write_config(tmp_path / "distill.toml", output, student, teacher.base_url, max_steps=6)
        command = [sys.executable, "-m", "apprentice", "distill", str(config)]
        proc = subprocess.Popen(command, env=env_with_key(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 300
        while len(read_metrics(output / "trainer" / "metrics.jsonl")) < 3:
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run: launcher, orchestrator, trainer
        proc.wait()
        time.sleep(0.5)  # let the teacher's handler threads finish recording requests that were in flight
        cached = {json.loads(p.read_text())["key"] for p in (output / "teacher_cache").rglob("*.json")}
        requests_before = len(teacher.chat_requests())
        assert cached

        rerun = subprocess.run(command, env=env_with_key(), capture_output=True, text=True, timeout=600)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert "resuming" in rerun.stdout
        new_requests = len(teacher.chat_requests()) - requests_before
    # Every answer cached before the kill is served from disk on the rerun; only uncached rollouts are paid.
    assert new_requests == 6 * 4 - len(cached)
    rows = read_metrics(output / "trainer" / "metrics.jsonl")
    steps = [r["step"] for r in rows]
    # Steps after the last complete checkpoint may appear twice in the log (trained, killed, retrained from the
    # checkpoint); every step 1..6 is trained and the run ends at 6.
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6] and steps[-1] == 6
    assert (output / "final" / "config.json").is_file()
    assert_no_secret(output)
    assert SECRET not in rerun.stdout + rerun.stderr
    assert_standard_modes(output)  # across the resume: checkpoints, metrics, caches, batches, final/


def assert_standard_modes(output: Path) -> None:
    from apprentice import fsio

    for path in output.rglob("*"):
        want = (fsio.DIR_MODE if path.is_dir() else fsio.FILE_MODE) & ~fsio._umask()
        assert os.stat(path).st_mode & 0o777 == want, f"{path}: {oct(os.stat(path).st_mode & 0o777)}"


def test_a_failing_trainer_stops_the_whole_run_with_a_clear_message(student: Path, tmp_path: Path) -> None:
    output = tmp_path / "run"
    # A damaged stored batch for step 1 (its checksum no longer matches): the trainer fails on it while the
    # orchestrator, continuing at step 2, would otherwise wait forever for it (backpressure): the launcher
    # must stop both, and the trainer's message must name the file and the fix. Two ranks, started by the
    # launcher: rank 0 fails on its file while rank 1 waits for it in a collective.
    from apprentice.handoff.rollouts import rank_file, write_step_batch
    from apprentice.types import TrainingSample

    sample = TrainingSample([1, 2, 3, 4], [False, True, True, True], [0.0] * 4, 1.0)
    write_step_batch(output, 1, [[sample], [sample]])
    damaged = rank_file(output, 1, 0)
    data = bytearray(damaged.read_bytes())
    data[-5] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with FaultTeacher(api_key=SECRET, respond=reverse_last_user) as teacher:
        config = write_config(tmp_path / "distill.toml", output, student, teacher.base_url, max_steps=4, num_processes=2)
        started = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "apprentice", "distill", str(config)], env=env_with_key(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr  # the BatchError's exit code
    assert "the trainer failed (exit code 1)" in proc.stderr and "stopping orchestrator" in proc.stderr
    # The trainer's own error, streamed with its prefix, once: the file, what is wrong, and how to fix it.
    errors = [line for line in proc.stdout.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("[trainer] apprentice train: error:"), errors
    assert f"{damaged}: checksum mismatch" in errors[0] and "every later rollouts/step_* directory" in errors[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert time.monotonic() - started < 120
