"""The trainer with trainer.loss.type = "distill" on the tiny student: soft targets from a tiny teacher through
step batches on disk, a few real optimizer steps, the student moving towards the teacher's distribution."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from apprentice.config import Config
from apprentice.handoff.rollouts import BatchError, write_step_batch
from apprentice.metrics import read_metrics
from apprentice.testing.tiny import build_tiny_model, save_tiny_student
from apprentice.trainer.metrics import metrics_path
from apprentice.trainer.train import main
from apprentice.types import TrainingSample

K = 8


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_student(tmp_path_factory.mktemp("student"))


def sequences(n: int = 6) -> list[tuple[list[int], list[bool]]]:
    rng = random.Random(0)
    out = []
    for _ in range(n):
        t = rng.randint(12, 30)
        prompt = rng.randint(3, 6)
        out.append(([rng.randrange(3, 60) for _ in range(t)], [i >= prompt for i in range(t)]))
    return out


def teacher_samples(vocab: int) -> list[TrainingSample]:
    """Each sequence with a sharp tiny teacher's top-K at its loss positions (a few left without targets)."""
    teacher = build_tiny_model(vocab, seed=7)
    samples = []
    for n, (ids, mask) in enumerate(sequences()):
        with torch.no_grad():
            lp = torch.log_softmax(8.0 * teacher(input_ids=torch.tensor([ids])).logits[0].double(), -1)  # [T, V]
        top_lp, top_ids = lp.topk(K, dim=-1)
        rows_ids: list[list[int]] = [[-1] * K]  # token 0 has no distribution before it
        rows_lps: list[list[float]] = [[0.0] * K]
        for t in range(1, len(ids)):  # row t: the distribution over token t, predicted at position t - 1
            if mask[t] and (t + n) % 5:
                rows_ids.append(top_ids[t - 1].tolist())
                rows_lps.append(top_lp[t - 1].float().tolist())
            else:
                rows_ids.append([-1] * K)
                rows_lps.append([0.0] * K)
        samples.append(TrainingSample(ids, mask, [0.0] * len(ids), 1.0, None, rows_ids, rows_lps))
    return samples


def forward_kl_to_targets(model: Any, samples: list[TrainingSample]) -> float:
    """Mean KL(teacher || student) over the positions with targets, on top-K + tail, over the full vocabulary."""
    total, count = 0.0, 0
    for s in samples:
        assert s.teacher_topk_ids is not None and s.teacher_topk_logprobs is not None
        with torch.no_grad():
            lsm = torch.log_softmax(model(input_ids=torch.tensor([s.token_ids])).logits[0].double(), -1)
        for t in range(1, len(s)):
            ids = [i for i in s.teacher_topk_ids[t] if i >= 0]
            if not ids:
                continue
            p = torch.tensor(s.teacher_topk_logprobs[t][: len(ids)], dtype=torch.float64).exp()
            q = lsm[t - 1, ids].exp()
            p_tail, q_tail = (1 - p.sum()).clamp_min(1e-12), (1 - q.sum()).clamp_min(1e-12)
            total += float((p * (p / q).log()).sum() + p_tail * (p_tail / q_tail).log())
            count += 1
    return total / count


def make_config(student: Path, output: Path, loss: dict[str, Any], max_steps: int = 4) -> Config:
    """A trainer for an off-policy distill run with the teacher's top-k (the trainer never calls the endpoint)."""
    teacher = {"base_url": "http://127.0.0.1:9/v1", "model": "teacher"}
    return Config.model_validate({
        "model": {"name": str(student)}, "output_dir": str(output), "log": {"progress": False},
        "orchestrator": {"rollout_model": teacher, "use_token_client": False, "sampling": {"top_logprobs": K}},
        "trainer": {"max_steps": max_steps, "micro_batch_tokens": 64, "logprob_chunk_tokens": 16, "loss": loss,
                    "optim": {"lr": 5e-3}, "ckpt": {"interval": 10}, "batch_timeout_s": 30.0},
    })  # fmt: skip


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_distill_run_moves_the_student_towards_the_teacher(student: Path, tmp_path: Path, divergence: str) -> None:
    initial = AutoModelForCausalLM.from_pretrained(student)
    samples = teacher_samples(initial.config.vocab_size)
    out = tmp_path / "run"
    for step in range(1, 5):
        write_step_batch(out, step, [samples])
    main(make_config(student, out, {"type": "distill", "divergence": divergence, "sft_weight": 0.1}))

    lines = read_metrics(metrics_path(out))
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    for key in ("distill/forward_kl", "distill/reverse_kl", "distill/topk_mass", "distill/target_fraction",
                "loss/divergence", "loss/nll", "loss/ppl"):  # fmt: skip
        assert all(key in m for m in lines), key
    assert 0.0 < lines[0]["distill/target_fraction"] < 1.0  # some loss positions train on the NLL
    assert 0.0 < lines[0]["distill/topk_mass"] <= 1.0
    # The divergence trained goes down; the JSD's gradients are small while the two are far apart (it saturates
    # at log 2), so it moves less in 3 updates than the forward KL.
    factor = 0.9 if divergence == "forward_kl" else 1.0
    assert lines[-1]["loss/divergence"] < factor * lines[0]["loss/divergence"]
    assert lines[-1]["distill/forward_kl"] < lines[0]["distill/forward_kl"]
    assert lines[-1]["loss/total"] < lines[0]["loss/total"]
    # The exported student is closer to the teacher's distribution than the initial one, measured independently.
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    before, after = forward_kl_to_targets(initial, samples), forward_kl_to_targets(final, samples)
    assert after < factor * before
    assert lines[0]["distill/forward_kl"] == pytest.approx(before, rel=1e-3)


def test_distill_loss_on_a_batch_without_targets_is_one_clear_error(student: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    write_step_batch(out, 1, [[TrainingSample(ids, mask, [0.0] * len(ids)) for ids, mask in sequences()]])
    with pytest.raises(BatchError, match=r'step_1 carries no top-k targets but trainer.loss.type = "distill"'):
        main(make_config(student, out, {"type": "distill"}, max_steps=1))


def test_a_teacher_top_k_id_beyond_the_students_embedding_is_one_clear_error(student: Path, tmp_path: Path) -> None:
    """A top-k id of a larger teacher vocabulary would fail the forward pass with a bare IndexError on every rerun;
    the trainer names the batch, the sample, the position and the id instead (-1 padding stays allowed)."""
    vocab = AutoModelForCausalLM.from_pretrained(student).config.vocab_size
    samples = teacher_samples(vocab)
    target = samples[2].teacher_topk_ids
    assert target is not None
    t = next(t for t, row in enumerate(target) if row[0] >= 0)
    target[t][K - 1] = vocab  # one past the last row
    out = tmp_path / "run"
    write_step_batch(out, 1, [samples])
    with pytest.raises(BatchError, match=rf"step_1: sample 2, position {t} holds teacher top-k id {vocab}, but the "
                                         rf"model's embedding has {vocab} rows"):  # fmt: skip
        main(make_config(student, out, {"type": "distill"}, max_steps=1))


def test_trainer_threads_applies_outside_apprentice_rl_too(student: Path, tmp_path: Path) -> None:
    """`trainer.threads` was read by `apprentice rl` only: `apprentice distill` / `train` kept torch's default."""
    out = tmp_path / "run"
    write_step_batch(out, 1, [teacher_samples(AutoModelForCausalLM.from_pretrained(student).config.vocab_size)])
    cfg = make_config(student, out, {"type": "distill"}, max_steps=1)
    cfg.trainer.threads = 1
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        main(cfg)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_lowering_max_steps_below_the_last_checkpoint_is_refused(student: Path, tmp_path: Path) -> None:
    """A rerun with max_steps = 1 after 2 steps trained nothing and exported the 2-step model as final/, exit 0."""
    from apprentice.config import ConfigError

    out = tmp_path / "run"
    samples = teacher_samples(AutoModelForCausalLM.from_pretrained(student).config.vocab_size)
    for step in (1, 2):
        write_step_batch(out, step, [samples])
    main(make_config(student, out, {"type": "distill"}, max_steps=2))
    exported = (out / "final" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(ConfigError, match=r"checkpoints/step_2 is past trainer.max_steps = 1: this run already trained 2"):
        main(make_config(student, out, {"type": "distill"}, max_steps=1))
    assert (out / "final" / "model.safetensors").stat().st_mtime_ns == exported
