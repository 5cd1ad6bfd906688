"""On-policy distillation's per-token advantages: the arithmetic against a reference, their way through the
transport and packing, and the rl loss using them with importance ratios."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from apprentice.clients.scoring import parse_prompt_logprobs
from apprentice.config.orchestrator import OnPolicyDistillConfig
from apprentice.config.trainer import RLLossConfig
from apprentice.handoff.rollouts import BatchError, decode_samples, encode_samples, read_step_batch, write_step_batch
from apprentice.orchestrator.on_policy import ReverseKL, apply_teacher_scores, distill_token_advantages
from apprentice.trainer.losses import LossInputs, rl_loss
from apprentice.trainer.packing import collate
from apprentice.types import TrainingSample


def reference_advantages(student: list[float], teacher: list[float], mask: list[bool], group_adv: float,
                         kl_coef: float, reward_coef: float) -> list[float]:  # fmt: skip
    """The formula of the issue, written out one token at a time."""
    out = []
    for t in range(len(student)):
        if mask[t]:
            reverse_kl_t = student[t] - teacher[t]  # log p_student(x_t) - log p_teacher(x_t)
            out.append(-kl_coef * reverse_kl_t + reward_coef * group_adv)
        else:
            out.append(0.0)
    return out


def test_token_advantages_match_the_reference() -> None:
    student = [0.0, 0.0, -0.5, -2.0, -0.1, -3.0]
    teacher = [0.0, 0.0, -0.2, -4.0, -0.1, -1.0]
    mask = [False, False, True, True, True, True]
    for kl, rc, a in ((1.0, 0.0, 0.7), (0.5, 2.0, -1.5), (0.0, 1.0, 0.3)):
        got = distill_token_advantages(student, teacher, mask, a, kl_coef=kl, reward_coef=rc)
        assert got == pytest.approx(reference_advantages(student, teacher, mask, a, kl, rc), abs=1e-12)
    # pure distillation: the teacher liked token 2 more (+0.3), token 3 less (-2.0), token 5 more (+2.0)
    assert distill_token_advantages(student, teacher, mask, 5.0, kl_coef=1.0, reward_coef=0.0) == pytest.approx(
        [0.0, 0.0, 0.3, -2.0, 0.0, 2.0]
    )
    with pytest.raises(ValueError, match="lengths differ"):
        distill_token_advantages(student, teacher[:-1], mask, 0.0, kl_coef=1.0, reward_coef=0.0)


def test_apply_teacher_scores_sets_per_token_advantages_and_the_reverse_kl() -> None:
    sample = TrainingSample([5, 6, 7, 8], [False, True, True, True], [0.0, -1.0, -0.5, -0.25], advantage=2.0)
    other = TrainingSample([5, 9], [False, True], [0.0, -3.0], advantage=-1.0)
    kl = ReverseKL()
    cfg = OnPolicyDistillConfig(kl_coef=1.0, reward_coef=0.5)
    apply_teacher_scores(sample, [0.0, -2.0, -0.5, 0.0], cfg, kl)
    apply_teacher_scores(other, [0.0, -1.0], cfg, kl)
    assert sample.token_advantages == pytest.approx([0.0, -1.0 + 1.0, 0.0 + 1.0, 0.25 + 1.0])
    assert other.token_advantages == pytest.approx([0.0, 2.0 - 0.5])
    assert sample.advantage == 2.0  # the group advantage is kept
    # mean over the 4 completion tokens of student - teacher: (1.0 + 0.0 - 0.25 - 2.0) / 4
    assert kl.tokens == 4 and kl.mean == pytest.approx(-1.25 / 4)


def test_transport_round_trips_per_token_advantages(tmp_path: Path) -> None:
    with_adv = TrainingSample([1, 2, 3], [False, True, True], [0.0, -0.5, -0.25], 0.5, [0.0, 0.75, -1.5])
    without = TrainingSample([4, 5], [False, True], [0.0, -1.0], -2.0)
    decoded = decode_samples(encode_samples([with_adv, without]), "mem")
    assert decoded == [with_adv, without]
    assert decode_samples(encode_samples([without]), "mem") == [without]  # old layout when none has them
    write_step_batch(tmp_path, 1, [[with_adv], [without]])
    assert read_step_batch(tmp_path, 1, 0) == [with_adv]
    with pytest.raises(ValueError, match="token_advantages has 2 values for 3 tokens"):
        TrainingSample([1, 2, 3], [False, True, True], [0.0, 0.0, 0.0], 1.0, [0.0, 1.0])


def test_transport_detects_a_tampered_per_token_column() -> None:
    from safetensors.torch import load, save

    data = encode_samples([TrainingSample([1, 2], [False, True], [0.0, -1.0], 1.0, [0.0, 3.0])])
    tensors = load(data)
    tensors["token_advantages"] = torch.tensor([0.0, 30.0])
    header_meta = {"format": "1", "sha256": "0" * 64}
    with pytest.raises(BatchError, match="checksum mismatch"):
        decode_samples(save(tensors, metadata=header_meta), "f.safetensors")


def test_packing_shifts_per_token_advantages_with_the_targets() -> None:
    a = TrainingSample([10, 11, 12], [False, True, True], [0.0, -0.1, -0.2], 9.0, [0.0, 1.5, -2.5])
    b = TrainingSample([20, 21], [False, True], [0.0, -0.3], 4.0)
    mb = collate([a, b])
    # position j predicts token j+1: a's targets 11, 12 carry 1.5, -2.5; b (no per-token values) carries 4.0
    assert mb.advantages[0].tolist() == [1.5, -2.5, 0.0, 4.0, 4.0]
    assert mb.loss_mask[0].tolist() == [True, True, False, True, False]


def reference_rl_loss(trainer_lp: list[float], inference_lp: list[float], mask: list[bool], adv: list[float],
                      n: int, cfg: RLLossConfig) -> tuple[float, list[float]]:  # fmt: skip
    """(loss, d loss / d trainer_lp) one token at a time: -ratio * A + kl_coef * log_ratio^2 on kept tokens."""
    loss, grad = 0.0, []
    for lp, ilp, m, a in zip(trainer_lp, inference_lp, mask, adv, strict=True):
        log_ratio = lp - ilp
        ratio = math.exp(log_ratio)
        if m and cfg.ratio_low <= ratio <= cfg.ratio_high:
            loss += (-ratio * a + cfg.kl_coef * log_ratio**2) / n
            grad.append((-ratio * a + 2 * cfg.kl_coef * log_ratio) / n)
        else:
            grad.append(0.0)
    return loss, grad


def test_rl_loss_uses_per_token_advantages_with_importance_ratios() -> None:
    cfg = RLLossConfig()
    inference = [-1.0, -0.5, -2.0, -0.3, -1.2, -0.7]
    trainer = [-0.9, -0.5, -2.1, -0.3, -5.0, -0.6]  # token 4 left the trust region: masked out of the gradient
    mask = [True, True, True, False, True, True]
    student, teacher = inference, [-0.2, -1.5, -2.0, -9.0, -0.2, -0.1]
    adv = distill_token_advantages(student, teacher, mask, 0.0, kl_coef=1.0, reward_coef=0.0)
    lp = torch.tensor(trainer, requires_grad=True)
    loss, metrics = rl_loss(LossInputs(lp, torch.tensor(inference), torch.tensor(mask), torch.tensor(adv), 7), cfg)
    loss.backward()
    expected_loss, expected_grad = reference_rl_loss(trainer, inference, mask, adv, 7, cfg)
    assert float(loss.detach()) == pytest.approx(expected_loss, abs=1e-6)
    assert lp.grad is not None and lp.grad.tolist() == pytest.approx(expected_grad, abs=1e-6)
    assert float(metrics["rl/masked_fraction"]) == pytest.approx(1 / 7)
    # The sign of the push: the teacher prefers token 0 (+0.8), so gradient descent raises its logprob.
    assert lp.grad[0] < 0 and lp.grad[1] > 0


def test_parse_prompt_logprobs_reads_the_vllm_shape_and_refuses_malformed_answers() -> None:
    ok = {"choices": [{"prompt_logprobs": [None, {"7": {"logprob": -0.5, "rank": 2}, "3": {"logprob": -0.1, "rank": 1}},
                                           {"9": {"logprob": -2.0, "rank": 5}}]}]}  # fmt: skip
    assert parse_prompt_logprobs(ok, [1, 7, 9]).logprobs == [None, -0.5, -2.0]
    assert parse_prompt_logprobs({"choices": [{"prompt_logprobs": [None, {"4": -1.0}], "prompt_token_ids": [2, 4]}]},
                                 None).token_ids == [2, 4]  # fmt: skip
    for bad, match in (
        ({"choices": [{"text": "x"}]}, "no 'prompt_logprobs' list"),
        ({"choices": []}, "no 'choices'"),
        (ok, "3 prompt_logprobs entries for a prompt of 2 tokens"),
        ({"choices": [{"prompt_logprobs": [None, {"8": {"logprob": -1.0}}, {"9": {"logprob": -1.0}}]}]}, "no entry for"),
        ({"choices": [{"prompt_logprobs": [None, {"7": {"logprob": 0.5}}, {"9": {"logprob": -1.0}}]}]}, "not a logprob"),
    ):
        with pytest.raises(ValueError, match=match):
            parse_prompt_logprobs(bad, [1, 7, 9] if match != "3 prompt_logprobs entries for a prompt of 2 tokens" else [1, 7])
