"""The distill loss against a dense reference: every divergence, value and gradient, on a tiny real model.

The reference below is written independently of apprentice: full-vocabulary float64 log-softmax of the
student's logits, the teacher's top-k taken from its own full distribution, tails summed over every other id.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from config_samples import MINIMAL, RL_CONFIG

from apprentice.config import ConfigError, DistillLossConfig, load_config
from apprentice.testing.tiny import build_tiny_model
from apprentice.trainer.logprobs import chunked_loss, full_loss
from apprentice.trainer.losses import LossInputs, build_loss, finalize_metrics, sft_loss

T, V, K = 40, 512, 8


def teacher_targets(teacher_logits: torch.Tensor, mask: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k ids/logprobs [T, K] of a full teacher distribution, with padding entries and rows without targets."""
    g = torch.Generator().manual_seed(seed)
    lp = torch.log_softmax(teacher_logits.double(), -1)
    top_lp, top_ids = lp.topk(K, dim=-1)
    pad = torch.rand(T, K, generator=g) < 0.25  # fewer than k candidates: those ids fall into the tail
    pad[:, 0] = False
    empty = (torch.rand(T, generator=g) < 0.2) | ~mask  # no targets: the NLL applies (always outside the mask)
    ids = torch.where(pad | empty.unsqueeze(-1), -1, top_ids)
    return ids, torch.where(ids >= 0, top_lp, 0.0).float()


def dense_reference(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, ids: torch.Tensor, t_lp: torch.Tensor,
    cfg: DistillLossConfig, n: int,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss position by position over the whole vocabulary (logits [T, V] float64, with grad)."""
    lsm = torch.log_softmax(logits, -1)
    total = logits.new_zeros(())
    fkl_sum = rkl_sum = mass_sum = 0.0
    for t in range(T):
        if not mask[t]:
            continue
        nll = -lsm[t, targets[t]]
        valid = [(int(i), float(lp)) for i, lp in zip(ids[t], t_lp[t], strict=True) if i >= 0]
        if not valid:
            total = total + nll
            continue
        support = [i for i, _ in valid]
        outside = torch.ones(V, dtype=torch.bool)
        outside[support] = False
        p = torch.tensor([math.exp(lp) for _, lp in valid] + [0.0], dtype=torch.float64)
        p[-1] = max(0.0, 1.0 - float(p[:-1].sum()))
        q = torch.cat([lsm[t, support].exp(), lsm[t][outside].exp().sum().reshape(1)])
        kl = lambda a, b: torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum()  # noqa: E731
        fkl, rkl = kl(p, q), kl(q, p)
        m = cfg.beta * p + (1 - cfg.beta) * q
        div = {"forward_kl": fkl, "reverse_kl": rkl, "jsd": cfg.beta * kl(p, m) + (1 - cfg.beta) * kl(q, m)}
        total = total + div[cfg.divergence] + cfg.sft_weight * nll
        fkl_sum, rkl_sum, mass_sum = fkl_sum + fkl.item(), rkl_sum + rkl.item(), mass_sum + p[:-1].sum().item()
    return total / n, {"distill/forward_kl": fkl_sum / n, "distill/reverse_kl": rkl_sum / n,
                       "distill/topk_mass": mass_sum / n}  # fmt: skip


@pytest.fixture(scope="module")
def case() -> dict[str, torch.Tensor]:
    """Hidden states and lm_head of a tiny student, the full logits of a tiny teacher (another seed)."""
    student, teacher = build_tiny_model(V, seed=0), build_tiny_model(V, seed=1)
    ids = torch.randint(3, V, (1, T + 1), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = student.model(input_ids=ids[:, :-1]).last_hidden_state[0]
        teacher_logits = teacher(input_ids=ids[:, :-1]).logits[0]
    # Random init gives near-uniform distributions; a sharper head and teacher make the divergences large.
    mask = torch.rand(T, generator=torch.Generator().manual_seed(1)) < 0.8
    return {"hidden": hidden, "weight": 6.0 * student.lm_head.weight.detach(), "teacher": 6.0 * teacher_logits,
            "targets": ids[0, 1:], "mask": mask}  # fmt: skip


@pytest.mark.parametrize("path", ["chunked", "full"])
@pytest.mark.parametrize(("divergence", "beta", "sft_weight"), [
    ("forward_kl", 0.5, 0.0), ("reverse_kl", 0.5, 0.0), ("jsd", 0.5, 0.0), ("jsd", 0.1, 0.3), ("forward_kl", 0.5, 0.7),
])  # fmt: skip
def test_equals_the_dense_reference_with_gradients(
    case: dict[str, torch.Tensor], path: str, divergence: str, beta: float, sft_weight: float
) -> None:
    cfg = DistillLossConfig(divergence=divergence, beta=beta, sft_weight=sft_weight)  # type: ignore[arg-type]
    mask, targets = case["mask"], case["targets"]
    ids, t_lp = teacher_targets(case["teacher"], mask, seed=2)
    n = int(mask.sum()) + 5  # other micro-batches' tokens count in the normaliser
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    zeros = torch.zeros(T)
    inputs = LossInputs(torch.empty(0), zeros, mask, zeros, n, teacher_topk_ids=ids, teacher_topk_logprobs=t_lp)
    if path == "chunked":
        loss, metrics = chunked_loss(hidden, weight, None, targets, inputs, build_loss(cfg), chunk=7)
    else:
        loss, metrics = full_loss(F.linear(hidden, weight), targets, inputs, build_loss(cfg))
    got = torch.autograd.grad(loss, [hidden, weight])

    h64 = case["hidden"].double().requires_grad_()
    w64 = case["weight"].double().requires_grad_()
    ref_loss, ref_metrics = dense_reference(h64 @ w64.T, targets, mask, ids, t_lp, cfg, n)
    want = torch.autograd.grad(ref_loss, [h64, w64])

    assert float(metrics["loss/divergence"]) > 5e-3  # a real divergence, not two near-uniform distributions
    assert abs(float(loss.detach()) - float(ref_loss.detach())) < 1e-5
    for g, w in zip(got, want, strict=True):
        assert float(w.abs().max()) > 1e-3
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5)
    for name, value in ref_metrics.items():
        assert float(metrics[name]) == pytest.approx(value, abs=1e-5), name
    has = mask & (ids >= 0).any(-1)
    assert float(metrics["distill/target_fraction"]) == pytest.approx(float(has.sum()) / n)
    step = finalize_metrics({k: float(v) for k, v in metrics.items()})
    assert step["distill/forward_kl"] == pytest.approx(ref_metrics["distill/forward_kl"] * n / float(has.sum()), rel=1e-5)


def test_rows_without_targets_are_the_nll_and_sft_weight_adds_it(case: dict[str, torch.Tensor]) -> None:
    mask, targets = case["mask"], case["targets"]
    n = int(mask.sum())
    logits = F.linear(case["hidden"], case["weight"])
    lp = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    zeros = torch.zeros(T)
    no_targets = LossInputs(torch.empty(0), zeros, mask, zeros, n, teacher_topk_ids=torch.full((T, K), -1),
                            teacher_topk_logprobs=torch.zeros(T, K))  # fmt: skip
    sft, _ = sft_loss(LossInputs(lp, zeros, mask, zeros, n))
    for inputs in (no_targets, LossInputs(torch.empty(0), zeros, mask, zeros, n)):  # all -1, or no top-k at all
        loss, metrics = full_loss(logits, targets, inputs, build_loss(DistillLossConfig(divergence="jsd")))
        assert float(loss) == pytest.approx(float(sft), abs=1e-6)
        assert float(metrics["distill/target_fraction"]) == 0.0
        assert "distill/forward_kl" not in finalize_metrics({k: float(v) for k, v in metrics.items()})

    ids, t_lp = teacher_targets(case["teacher"], mask, seed=3)
    with_targets = LossInputs(torch.empty(0), zeros, mask, zeros, n, teacher_topk_ids=ids, teacher_topk_logprobs=t_lp)
    base, _ = full_loss(logits, targets, with_targets, build_loss(DistillLossConfig()))
    weighted, _ = full_loss(logits, targets, with_targets, build_loss(DistillLossConfig(sft_weight=0.25)))
    has = mask & (ids >= 0).any(-1)
    assert float(weighted - base) == pytest.approx(0.25 * float(-lp[has].sum()) / n, abs=1e-6)


def test_a_teacher_without_tail_keeps_every_divergence_finite() -> None:
    """A confident teacher's top-k sums to 1 (or a hair above) in float32: its tail is 0 and clamped."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=g).requires_grad_()
    weight = torch.randn(64, 16, generator=g).requires_grad_()
    ids = torch.tensor([[5, 9, -1]] * 4)
    t_lp = torch.tensor([[0.0, -30.0, 0.0]] * 4)
    inputs = LossInputs(torch.empty(0), torch.zeros(4), torch.ones(4, dtype=torch.bool), torch.zeros(4), 4,
                        teacher_topk_ids=ids, teacher_topk_logprobs=t_lp)  # fmt: skip
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss, _ = chunked_loss(hidden, weight, None, torch.zeros(4, dtype=torch.long), inputs,
                               build_loss(DistillLossConfig(divergence=divergence)), chunk=3)  # type: ignore[arg-type]
        grads = torch.autograd.grad(loss, [hidden, weight])
        assert math.isfinite(float(loss.detach())) and all(bool(torch.isfinite(x).all()) for x in grads), divergence


@pytest.mark.parametrize("source", ["off_policy", "on_policy"])
def test_distill_config_from_toml_and_overrides(tmp_path: Path, source: str) -> None:
    # The distill loss needs a source of teacher distributions: the teacher's chat top_logprobs (off-policy) or
    # an on-policy teacher's top-k.
    if source == "off_policy":
        path, extra = MINIMAL, ["--orchestrator.sampling.top_logprobs", "5"]
    else:
        path, extra = tmp_path / "rl.toml", []
        path.write_text(RL_CONFIG + '\n[orchestrator.teacher_model]\nbase_url = "http://127.0.0.1:8000/v1"\nmodel = "t"\n'
                        "\n[orchestrator.on_policy_distill]\ntop_k = 8\n")
    soft_targets = [*extra, "--trainer.loss.type", "distill"]
    cfg = load_config([path], [*soft_targets, "--trainer.loss.divergence", "jsd", "--trainer.loss.beta", "0.2",
                               "--trainer.loss.sft_weight", "0.1"])  # fmt: skip
    assert cfg.trainer.loss == DistillLossConfig(divergence="jsd", beta=0.2, sft_weight=0.1)
    for bad in (["--trainer.loss.beta", "1.0"], ["--trainer.loss.divergence", "kl"], ["--trainer.loss.sft_weight", "-1"]):
        with pytest.raises(ConfigError, match="trainer.loss"):
            load_config([path], [*soft_targets, *bad])
