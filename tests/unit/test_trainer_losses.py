"""Losses against direct reference computations on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch

from apprentice.config import RLLossConfig, SFTLossConfig
from apprentice.trainer.losses import (
    LOSSES,
    LossInputs,
    build_loss,
    finalize_metrics,
    rl_loss,
    sft_loss,
    target_logprobs,
)


def make_inputs(seed: int = 0, t: int = 12, n_global: int | None = None) -> tuple[LossInputs, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, 7, generator=g, requires_grad=True)
    targets = torch.randint(0, 7, (t,), generator=g)
    lp = target_logprobs(logits, targets)
    mask = torch.rand(t, generator=g) < 0.6
    mask[0] = True
    inference = (lp.detach() + 0.3 * torch.randn(t, generator=g)).clamp(max=0.0)
    adv = torch.randn(t, generator=g)
    n = int(mask.sum()) if n_global is None else n_global
    return LossInputs(lp, inference, mask, adv, n), logits


def test_target_logprobs_matches_log_softmax() -> None:
    logits = torch.randn(5, 11)
    targets = torch.tensor([0, 3, 10, 2, 2])
    expected = torch.log_softmax(logits, -1)[torch.arange(5), targets]
    torch.testing.assert_close(target_logprobs(logits, targets), expected)


def test_sft_is_masked_mean_nll() -> None:
    inputs, _ = make_inputs()
    loss, metrics = sft_loss(inputs)
    lp, mask = inputs.trainer_logprobs.tolist(), inputs.loss_mask.tolist()
    reference = -sum(x for x, m in zip(lp, mask, strict=True) if m) / sum(mask)
    assert loss.item() == pytest.approx(reference, rel=1e-6)
    summed = finalize_metrics({k: float(v) for k, v in metrics.items()})
    assert summed["loss/tokens"] == sum(mask)
    assert summed["loss/ppl"] == pytest.approx(math.exp(reference), rel=1e-5)


def test_rl_matches_reference_per_token() -> None:
    cfg = RLLossConfig(ratio_low=0.8, ratio_high=1.25, kl_coef=0.1)
    inputs, logits = make_inputs(seed=1)
    loss, metrics = rl_loss(inputs, cfg)
    total, kept, masked, k3 = 0.0, 0, 0, 0.0
    n = inputs.num_global_tokens
    for lp, ilp, m, a in zip(inputs.trainer_logprobs.tolist(), inputs.inference_logprobs.tolist(),
                             inputs.loss_mask.tolist(), inputs.advantages.tolist(), strict=True):
        if not m:
            continue
        r = math.exp(lp - ilp)
        k3 += r - 1 - (lp - ilp)
        if cfg.ratio_low <= r <= cfg.ratio_high:
            total += -r * a + cfg.kl_coef * (lp - ilp) ** 2
            kept += 1
        else:
            masked += 1
    assert 0 < kept and 0 < masked  # the test data exercises both branches
    assert loss.item() == pytest.approx(total / n, rel=1e-5)
    assert float(metrics["rl/masked_fraction"]) == pytest.approx(masked / n)
    assert float(metrics["rl/mismatch_kl"]) == pytest.approx(k3 / n, rel=1e-5)
    # Gradient: d/dlp of (-r a + c lr^2) = -r a + 2 c lr on kept tokens, 0 elsewhere.
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_rl_gradient_is_zero_on_masked_tokens() -> None:
    lp = torch.tensor([-1.0, -1.0, -1.0], requires_grad=True)
    inputs = LossInputs(lp, torch.tensor([-1.0, -3.0, -90.0]), torch.tensor([True, True, True]),
                        torch.ones(3), 3)
    loss, _ = rl_loss(inputs, RLLossConfig())
    loss.backward()
    assert lp.grad is not None
    assert lp.grad[0] == pytest.approx(-1 / 3)  # ratio 1, advantage 1
    assert lp.grad[1:].tolist() == [0.0, 0.0]  # ratios e^2 and e^89 lie outside [0.5, 2]: no gradient, no NaN


def test_rl_with_zero_inference_logprobs_is_meaningless() -> None:
    """Teacher rollouts carry logprobs 0.0: the 'ratio' is just p_student, far outside any trust region."""
    torch.manual_seed(0)
    logits = torch.randn(64, 512, requires_grad=True)  # a fresh student over a 512-token vocabulary
    targets = torch.randint(0, 512, (64,))
    lp = target_logprobs(logits, targets)
    inputs = LossInputs(lp, torch.zeros(64), torch.ones(64, dtype=torch.bool), torch.ones(64), 64)
    loss, metrics = rl_loss(inputs, RLLossConfig())
    assert float(metrics["rl/ratio_mean"]) < 0.05  # ratios ~1/512, not ~1
    assert float(metrics["rl/masked_fraction"]) == 1.0  # every token is rejected by the trust region
    assert float(metrics["rl/mismatch_kl"]) > 4.0  # ~log(512) - 1: a large, meaningless mismatch
    loss.backward()
    assert logits.grad is not None and float(logits.grad.abs().max()) == 0.0  # nothing would be learnt


def test_normalisation_is_additive_over_splits() -> None:
    """Two halves normalised by the global count sum to the loss of the whole: how ranks/micro-batches combine."""
    inputs, _ = make_inputs(seed=2, t=20)
    n = int(inputs.loss_mask.sum())
    for fn in (sft_loss, rl_loss):
        whole, _ = fn(inputs)
        halves = []
        for sl in (slice(0, 9), slice(9, 20)):
            part = LossInputs(inputs.trainer_logprobs[sl], inputs.inference_logprobs[sl], inputs.loss_mask[sl],
                              inputs.advantages[sl], n)
            halves.append(float(fn(part)[0].detach()))
        assert sum(halves) == pytest.approx(float(whole.detach()), rel=1e-5)


def test_no_loss_tokens_still_has_a_graph() -> None:
    lp = torch.zeros(4, requires_grad=True)
    inputs = LossInputs(lp, torch.zeros(4), torch.zeros(4, dtype=torch.bool), torch.ones(4), 1)
    for fn in (sft_loss, rl_loss):
        loss, _ = fn(inputs)
        assert float(loss.detach()) == 0.0
        loss.backward()  # every rank must be able to run backward with nothing to learn


def test_mapping_chooses_by_type() -> None:
    assert set(LOSSES) == {"sft", "rl", "distill"}
    inputs, _ = make_inputs()
    assert float(build_loss(SFTLossConfig())(inputs)[0].detach()) == float(sft_loss(inputs)[0].detach())
    assert float(build_loss(RLLossConfig(kl_coef=0.5))(inputs)[0].detach()) == float(rl_loss(inputs, RLLossConfig(kl_coef=0.5))[0].detach())
