"""On-policy distillation for real: `apprentice rl` (server, orchestrator, trainer processes) with a teacher served
by `apprentice serve` on loopback; tiny student and a tiny teacher of the same tokenizer, then of another, CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apprentice.inference.launch import free_port, local_server
from apprentice.metrics import read_metrics
from apprentice.testing.tiny import save_tiny_student
from apprentice.testing.tiny_sp import save_ascii_student, save_tiny_sp_model


def apprentice_rl(tmp_path: Path, student: Path, teacher_dir: Path, teacher_keys: str = "",
                  max_steps: int = 2) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """`apprentice rl` for `max_steps` steps of 4 reverse-text samples into tmp_path/run (rerun: resume), the
    student scored by `teacher_dir` served on loopback (`teacher_keys`: extra [orchestrator.teacher_model] lines)."""
    config = tmp_path / "opd.toml"
    with local_server(teacher_dir, extra_args=["--served-model-name", "teacher", "--threads", "1"]) as teacher_url:
        config.write_text(f"""
output_dir = "{tmp_path / "run"}"
[model]
name = "{student}"
[inference]
port = {free_port()}
threads = 1
[orchestrator]
batch_size = 4
max_async_level = 0
truncated = "keep"
[orchestrator.teacher_model]
base_url = "{teacher_url}"
model = "teacher"
{teacher_keys}
[orchestrator.sampling]
max_tokens = 8
[[orchestrator.env]]
id = "reverse-text"
[trainer]
max_steps = {max_steps}
micro_batch_tokens = 1024
[trainer.loss]
type = "rl"
""")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        return subprocess.run([sys.executable, "-m", "apprentice", "rl", str(config)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip


def run_opd(tmp_path: Path, student: Path, teacher_dir: Path, teacher_keys: str = "") -> tuple[Path, list, list]:
    """`apprentice_rl` for 2 steps, which must succeed; (output dir, orchestrator and trainer metrics)."""
    done = apprentice_rl(tmp_path, student, teacher_dir, teacher_keys)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    output = tmp_path / "run"
    orch = read_metrics(output / "orchestrator" / "metrics.jsonl")
    trainer = read_metrics(output / "trainer" / "metrics.jsonl")
    assert [m["step"] for m in orch] == [1, 2] and [m["step"] for m in trainer] == [1, 2]
    return output, orch, trainer


def test_apprentice_rl_with_a_teacher_trains_on_per_token_reverse_kl(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    teacher_dir = save_tiny_student(tmp_path / "teacher", seed=5)
    output, orch, trainer = run_opd(tmp_path, student, teacher_dir)
    assert all(m["distill/scored_samples"] == 4 and m["distill/scored_tokens"] > 0 for m in orch)
    assert orch[0]["distill/requests"] >= 4  # one request per sample (the startup probe has its own client)
    assert orch[0]["distill/teacher_noise"] == 0.0
    # At step 1 the trainer's weights are the sampler's (ratio 1), so the policy-gradient term is minus the mean
    # per-token advantage, i.e. exactly the reverse KL the orchestrator measured: the advantages crossed intact.
    assert trainer[0]["loss/pg"] == pytest.approx(orch[0]["distill/reverse_kl"], abs=1e-3)
    assert any((output / "teacher_cache").rglob("*.json"))
    assert (output / "final" / "config.json").is_file()


def test_apprentice_rl_with_a_teacher_on_another_tokenizer(tmp_path: Path) -> None:
    """The teacher has a SentencePiece-style byte-fallback tokenizer and a Phi-3-style template (turns end with
    <|end|>); the student a byte-level BPE with ChatML. The run probes the teacher, scores the student's text
    after the conversation in the teacher's template, aligns by bytes and trains."""
    student = save_ascii_student(tmp_path / "student", seed=0)  # an untrained student whose samples are text
    teacher_dir = save_tiny_sp_model(tmp_path / "teacher", seed=5)
    output, orch, trainer = run_opd(tmp_path, student, teacher_dir, f'tokenizer = "{teacher_dir}"\nscoring = "echo"')
    for m in orch:
        set_aside = sum(v for k, v in m.items() if k.startswith("distill/set_aside/"))
        assert m["distill/scored_samples"] + set_aside == 4 and m["distill/scored_samples"] >= 1
        assert m["distill/teacher_noise"] == 0.0 and m["distill/requests"] >= m["distill/scored_samples"]
        # The teacher side over the served teacher's /tokenize: its requests are logged beside the scoring ones.
        assert m["distill/tokenize/requests"] >= m["distill/scored_samples"] + 1
        assert 0.0 <= m["distill/multi_token_chunks"] <= 1.0
    # At step 1 the trainer's weights are the sampler's (ratio 1): the policy-gradient term is minus the mean
    # per-token advantage, the reverse KL the orchestrator measured from the byte-aligned teacher scores.
    assert trainer[0]["loss/pg"] == pytest.approx(orch[0]["distill/reverse_kl"], abs=1e-3)
    assert (output / "final" / "config.json").is_file()


def test_a_spend_cap_on_the_scoring_teacher_stops_apprentice_rl_cleanly_and_a_raised_cap_resumes(tmp_path: Path) -> None:
    """max_tokens_total on [orchestrator.teacher_model] is enforced (it was once accepted and ignored): with a cap
    of 100 tokens the startup probe's first request spends it, nothing more is sent, and `apprentice rl` stops
    with exit code 3 naming the key; the ledger keeps what was paid. Raised, the same command runs the steps."""
    student = save_tiny_student(tmp_path / "student", seed=0)
    teacher_dir = save_tiny_student(tmp_path / "teacher", seed=5)
    done = apprentice_rl(tmp_path, student, teacher_dir, "max_tokens_total = 100", max_steps=1)
    said = done.stdout + done.stderr
    assert done.returncode == 3, said[-3000:]
    assert "orchestrator.teacher_model.max_tokens_total = 100" in said and "apprentice rl: stopped at the teacher spend cap" in said
    output = tmp_path / "run"
    paid = json.loads((output / "orchestrator" / "usage.json").read_text())
    assert paid["prompt_tokens"] + paid["completion_tokens"] >= 100
    assert not (output / "rollouts" / "step_1").exists() and not (output / "final").exists()

    done = apprentice_rl(tmp_path, student, teacher_dir, "max_tokens_total = 1_000_000", max_steps=1)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    orch = read_metrics(output / "orchestrator" / "metrics.jsonl")
    assert [m["step"] for m in orch] == [1] and orch[0]["distill/scored_samples"] == 4
    total = json.loads((output / "orchestrator" / "usage.json").read_text())
    assert total["prompt_tokens"] > paid["prompt_tokens"]
    assert orch[0]["teacher/usage_total/prompt_tokens"] == total["prompt_tokens"]
