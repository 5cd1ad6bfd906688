"""Top-k distillation for real, on CPU with tiny models and `apprentice serve` as the teacher (same tokenizer):
off-policy (`apprentice distill`, the teacher's chat top_logprobs) and on-policy (`apprentice rl`, the teacher's
prompt_logprobs = k), each through orchestrator, step batches and the trainer's distill loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from apprentice.handoff.rollouts import read_step_batch
from apprentice.inference.launch import free_port, local_server
from apprentice.metrics import read_metrics
from apprentice.testing.tiny import save_tiny_student

COMMON = """
[orchestrator.sampling]
max_tokens = 8
temperature = 1.0
{sampling}
[[orchestrator.env]]
id = "reverse-text"
[trainer]
max_steps = 2
micro_batch_tokens = 1024
[trainer.loss]
type = "distill"
divergence = "forward_kl"
[trainer.optim]
lr = 1e-3
"""


@pytest.mark.slow  # `apprentice distill` / `apprentice rl` with a served teacher: ~2 min each on a loaded 2-core machine
@pytest.mark.parametrize("mode", ["off_policy", "on_policy"])
def test_top_k_distillation_end_to_end(tmp_path: Path, mode: str) -> None:
    student = save_tiny_student(tmp_path / "student", seed=0)
    teacher_dir = save_tiny_student(tmp_path / "teacher", seed=5)
    output = tmp_path / "run"
    with local_server(teacher_dir, extra_args=["--served-model-name", "teacher", "--threads", "1"]) as url:
        if mode == "off_policy":
            head = f"""
[orchestrator]
batch_size = 4
max_async_level = 0
use_token_client = false
truncated = "keep"
[orchestrator.rollout_model]
base_url = "{url}"
model = "teacher"
"""
            sampling, command = "top_logprobs = 4", "distill"
        else:
            head = f"""
[inference]
port = {free_port()}
threads = 1
[orchestrator]
batch_size = 4
max_async_level = 0
truncated = "keep"
[orchestrator.teacher_model]
base_url = "{url}"
model = "teacher"
[orchestrator.on_policy_distill]
top_k = 4
"""
            sampling, command = "", "rl"
        config = tmp_path / "run.toml"
        config.write_text(f'output_dir = "{output}"\n[model]\nname = "{student}"\n' + head + COMMON.format(sampling=sampling))
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "apprentice", command, str(config)], env=env, capture_output=True,
                              text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    orch = read_metrics(output / "orchestrator" / "metrics.jsonl")
    trainer = read_metrics(output / "trainer" / "metrics.jsonl")
    assert [m["step"] for m in trainer] == [1, 2]
    for m in orch:
        assert 0.0 < m["distill/topk_mass"] <= 1.0 + 1e-6
        if mode == "off_policy":
            # Same tokenizer: every ordinary token maps. A random tiny teacher often writes token sequences the
            # tokenizer would merge differently (`retokenized`: no soft targets from there on), and now and then
            # samples a special token such as <|endoftext|> mid-answer, which its text drops (`unmapped_token`, seen
            # in about one run in four); nothing else is uncovered.
            assert m["distill/topk/covered_fraction"] > 0.0
            kinds = {k.rsplit("/", 1)[1] for k in m if k.startswith("distill/topk/uncovered/")}
            assert kinds <= {"retokenized", "not_scored", "unmapped_token"}
    assert all("distill/forward_kl" in m and m["distill/forward_kl"] >= 0.0 for m in trainer)
    batch = read_step_batch(output, 1, 0)
    assert any(s.teacher_topk_ids is not None and any(r[0] >= 0 for r in s.teacher_topk_ids) for s in batch)
