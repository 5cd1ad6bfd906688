"""On-policy distillation for real: `apprentice rl` (server, orchestrator, trainer processes) with a teacher served
by `apprentice serve` on loopback; tiny student and a tiny teacher of the same tokenizer, CPU."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apprentice.config import ConfigError, load_config
from apprentice.inference.launch import free_port, local_server
from apprentice.metrics import read_metrics
from apprentice.orchestrator.loop import run
from apprentice.testing.tiny import save_tiny_student


def test_apprentice_rl_with_a_teacher_trains_on_per_token_reverse_kl(tmp_path: Path) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    teacher_dir = save_tiny_student(tmp_path / "teacher", seed=5)
    output = tmp_path / "run"
    config = tmp_path / "opd.toml"
    with local_server(teacher_dir, extra_args=["--served-model-name", "teacher", "--threads", "1"]) as teacher_url:
        config.write_text(f"""
output_dir = "{output}"
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
[orchestrator.sampling]
max_tokens = 8
[[orchestrator.env]]
id = "reverse-text"
[trainer]
max_steps = 2
micro_batch_tokens = 1024
[trainer.loss]
type = "rl"
""")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "apprentice", "rl", str(config)], env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    orch = read_metrics(output / "orchestrator" / "metrics.jsonl")
    trainer = read_metrics(output / "trainer" / "metrics.jsonl")
    assert [m["step"] for m in orch] == [1, 2] and [m["step"] for m in trainer] == [1, 2]
    assert all(m["distill/scored_samples"] == 4 and m["distill/scored_tokens"] > 0 for m in orch)
    assert orch[0]["distill/requests"] >= 5  # the startup probe plus one request per sample
    # At step 1 the trainer's weights are the sampler's (ratio 1), so the policy-gradient term is minus the mean
    # per-token advantage, i.e. exactly the reverse KL the orchestrator measured: the advantages crossed intact.
    assert trainer[0]["loss/pg"] == pytest.approx(orch[0]["distill/reverse_kl"], abs=1e-3)
    assert any((output / "teacher_cache").rglob("*.json"))
    assert (output / "final" / "config.json").is_file()


def test_a_teacher_with_another_tokenizer_is_refused_at_startup(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from apprentice.testing.tiny import build_tiny_tokenizer

    student = save_tiny_student(tmp_path / "student", seed=0)
    teacher_dir = save_tiny_student(tmp_path / "teacher", seed=5, vocab_size=400)
    assert AutoTokenizer.from_pretrained(teacher_dir).get_vocab() == build_tiny_tokenizer(400).get_vocab()
    config = tmp_path / "opd.toml"
    config.write_text(f"""
output_dir = "{tmp_path / 'run'}"
[model]
name = "{student}"
[orchestrator.student_endpoint]
base_url = "http://127.0.0.1:9/v1"
model = "student"
[orchestrator.teacher_model]
base_url = "http://127.0.0.1:9/v1"
model = "{teacher_dir}"
[trainer.loss]
type = "rl"
""")
    # The orchestrator refuses before it waits for the student server (nothing listens on port 9).
    with pytest.raises(ConfigError) as info:
        asyncio.run(asyncio.wait_for(run(load_config([config])), timeout=60))
    assert "does not share the student's tokenizer" in str(info.value) and "their vocabularies differ" in str(info.value)
