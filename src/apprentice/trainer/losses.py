"""Losses: plain functions `(LossInputs) -> (loss, metrics)`, chosen from `trainer.loss.type` by a mapping.

Normalisation: every component is summed over loss tokens and divided by `num_global_tokens`, the number of
loss tokens in the whole step (all micro-batches, all ranks). Summing the returned losses over micro-batches
and ranks therefore gives exactly the per-token mean of the step, however the data was split, which is what
makes 1-rank and N-rank runs (and packed and unpacked ones) compute the same gradient.

Because of this every loss is a sum over tokens: computing it chunk by chunk over the positions of a
micro-batch (trainer/logprobs.py does, to bound memory) and adding the chunks gives the same loss, gradient
and metrics. A new loss must keep that property (per-token terms over `num_global_tokens`).

Metrics follow the same rule: each value is this micro-batch's additive share (a token count, or a sum
divided by `num_global_tokens`), so the trainer sums them over micro-batches and all-reduces with SUM;
`finalize_metrics` then adds the derived ones (perplexity).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from apprentice.config.trainer import DistillLossConfig, LossConfig, RLLossConfig, SFTLossConfig

# Log ratios beyond this are already far outside any trust region; clamping keeps exp() finite in metrics.
_MAX_LOG_RATIO = 20.0
# The teacher's tail is 1 - its top-k mass, which rounds to 0 when a confident teacher's top-k sums to 1 in
# float32; a log of 0 would make the reverse KL and the JSD infinite, so logs of the tail use at least this.
TEACHER_TAIL_FLOOR = 1e-12
# Smallest student tail mass whose log is taken (float32's smallest normal number: log is about -87.3).
STUDENT_TAIL_FLOOR = torch.finfo(torch.float32).tiny


@dataclass
class LossInputs:
    """Per-position tensors of one micro-batch, all of shape [T] (flattened packed row)."""

    trainer_logprobs: torch.Tensor
    """[T] float32 log p_student(target) from the current weights; carries the gradient."""
    inference_logprobs: torch.Tensor
    """[T] float32 logprob of the target under the policy that sampled it (0.0 where none exists)."""
    loss_mask: torch.Tensor
    """[T] bool: positions whose target is trained."""
    advantages: torch.Tensor
    """[T] float32 advantage of each position's target: the sequence advantage broadcast, or per-token values
    (on-policy distillation: kl_coef * (teacher_lp - student_lp) + reward_coef * group advantage)."""
    num_global_tokens: int
    """Loss tokens in the whole step across micro-batches and ranks (the normaliser); at least 1."""
    teacher_topk_ids: torch.Tensor | None = None
    """[T, k] int64 the teacher's top-k ids for each position's target (-1: padding; a row of -1: no targets)."""
    teacher_topk_logprobs: torch.Tensor | None = None
    """[T, k] float32 the teacher's logprobs of those ids (ignored where the id is -1)."""
    student_topk_logprobs: torch.Tensor | None = None
    """[T, k] float32 log p_student of `teacher_topk_ids` (of `topk_index`'s stand-ins where the id is -1);
    set by trainer/logprobs.py whenever teacher ids are; carries the gradient."""
    student_tail_logprobs: torch.Tensor | None = None
    """[T] float32 log of the student's mass outside the valid teacher ids (at least log STUDENT_TAIL_FLOOR);
    carries the gradient. Meaningless on rows without targets."""

    def select(self, index: torch.Tensor) -> LossInputs:
        """The same inputs at positions `index` [N] int64 only (every per-position tensor gathered; scalars kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name).index_select(0, index) for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor) and getattr(self, f.name).numel()
        })  # fmt: skip

    def positions(self, start: int, end: int) -> LossInputs:
        """The same inputs restricted to positions [start, end) (every [T] tensor sliced; scalars kept)."""
        return dataclasses.replace(self, **{
            f.name: getattr(self, f.name)[start:end] for f in dataclasses.fields(self)
            if isinstance(getattr(self, f.name), torch.Tensor)
        })  # fmt: skip


Metrics = dict[str, torch.Tensor]
LossFn = Callable[[LossInputs], tuple[torch.Tensor, Metrics]]


def target_logprobs(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """logits [..., V], target_ids [...] -> log softmax(logits)[target] [...], computed in float32."""
    logits = logits.float()
    picked = logits.gather(-1, target_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def topk_index(teacher_ids: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """teacher_ids [T, k] (-1 padding), target_ids [T] -> [T, k] ids safe to gather and scatter with.

    Padding becomes a copy of the row's first valid id (the target where the row has none), so that writing
    the same value at every entry of a row (zeroing the top-k mass) never touches an id outside the support.
    """
    valid = teacher_ids >= 0
    first = teacher_ids.gather(-1, valid.to(torch.uint8).argmax(-1, keepdim=True))  # [T, 1]
    fallback = torch.where(valid.any(-1, keepdim=True), first, target_ids.unsqueeze(-1))
    return torch.where(valid, teacher_ids, fallback)


def sft_loss(inputs: LossInputs, cfg: SFTLossConfig | None = None) -> tuple[torch.Tensor, Metrics]:
    """Masked negative log-likelihood. Metrics: loss/nll (share), loss/tokens (count); ppl in finalize."""
    mask = inputs.loss_mask
    nll_sum = -torch.where(mask, inputs.trainer_logprobs, 0.0).sum()
    loss = nll_sum / inputs.num_global_tokens
    return loss, {"loss/nll": loss.detach(), "loss/tokens": mask.sum().float()}


def rl_loss(inputs: LossInputs, cfg: RLLossConfig | None = None) -> tuple[torch.Tensor, Metrics]:
    """Importance-weighted policy gradient with trust-region masking and an optional squared-log-ratio penalty.

    ratio_t = exp(trainer_lp_t - inference_lp_t). Tokens whose ratio left [ratio_low, ratio_high] (the policy
    moved too far from the sampler, or the logprobs do not belong to this model) are dropped from the gradient
    but still count in the normaliser. Per kept token: -ratio_t * A + kl_coef * log_ratio_t^2.
    Metrics: loss/pg, loss/kl_penalty, rl/mismatch_kl (k3 estimate of KL(sampler || trainer) over all loss
    tokens), rl/masked_fraction, rl/ratio_mean, loss/tokens.
    """
    cfg = cfg or RLLossConfig()
    mask = inputs.loss_mask
    n = inputs.num_global_tokens
    log_ratio = torch.where(mask, inputs.trainer_logprobs - inputs.inference_logprobs, 0.0)
    lr_detached = log_ratio.detach().clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio_detached = lr_detached.exp()
    keep = mask & (ratio_detached >= cfg.ratio_low) & (ratio_detached <= cfg.ratio_high)
    # exp only of kept log ratios: an inf in a dropped branch would still poison the gradient as 0 * inf.
    kept_log_ratio = torch.where(keep, log_ratio, 0.0)
    ratio = kept_log_ratio.exp()
    pg = -torch.where(keep, ratio * inputs.advantages, 0.0).sum() / n
    kl_penalty = cfg.kl_coef * kept_log_ratio.pow(2).sum() / n
    loss = pg + kl_penalty
    k3 = torch.where(mask, ratio_detached - 1.0 - lr_detached, 0.0)
    metrics = {
        "loss/pg": pg.detach(),
        "loss/kl_penalty": kl_penalty.detach(),
        "rl/mismatch_kl": k3.sum() / n,
        "rl/masked_fraction": (mask & ~keep).sum().float() / n,
        "rl/ratio_mean": torch.where(mask, ratio_detached, 0.0).sum() / n,
        "loss/tokens": mask.sum().float(),
    }
    return loss, metrics


def forward_kl(p: torch.Tensor, log_p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) [T] over the support [T, k + 1]; entries where p = 0 add nothing."""
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def reverse_kl(p: torch.Tensor, log_p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(student || teacher) [T] over the support [T, k + 1] (q = 0 on padding, so padding adds nothing)."""
    return (q * (log_q - log_p)).sum(-1)


def generalized_jsd(
    p: torch.Tensor, log_p: torch.Tensor, q: torch.Tensor, log_q: torch.Tensor, beta: float
) -> torch.Tensor:
    """GKD's JSD_beta [T] = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q, over [T, k + 1]."""
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    return beta * forward_kl(p, log_p, q, log_m) + (1.0 - beta) * reverse_kl(p, log_m, q, log_q)


def _support(inputs: LossInputs) -> tuple[torch.Tensor, ...]:
    """The teacher's and the student's distributions over the k + 1 outcomes (top-k ids, tail) of each row.

    Returns valid [T, k], p, log_p, q, log_q [T, k + 1] and the teacher's top-k mass [T]. Padding entries
    have p = q = 0 and finite logs (no inf meets a gradient).
    """
    ids, t_lp = inputs.teacher_topk_ids, inputs.teacher_topk_logprobs
    s_lp, s_tail = inputs.student_topk_logprobs, inputs.student_tail_logprobs
    assert ids is not None and t_lp is not None and s_lp is not None and s_tail is not None
    valid = ids >= 0
    t_lp = torch.where(valid, t_lp.float(), 0.0)
    s_lp = torch.where(valid, s_lp, 0.0)
    t_p = torch.where(valid, t_lp.exp(), 0.0)
    mass = t_p.sum(-1)
    t_tail = (1.0 - mass).clamp_min(0.0)
    p = torch.cat([t_p, t_tail.unsqueeze(-1)], -1)
    log_p = torch.cat([t_lp, t_tail.clamp_min(TEACHER_TAIL_FLOOR).log().unsqueeze(-1)], -1)
    q = torch.cat([torch.where(valid, s_lp.exp(), 0.0), s_tail.exp().unsqueeze(-1)], -1)
    log_q = torch.cat([s_lp, s_tail.unsqueeze(-1)], -1)
    return valid, p, log_p, q, log_q, mass


def distill_loss(inputs: LossInputs, cfg: DistillLossConfig | None = None) -> tuple[torch.Tensor, Metrics]:
    """The teacher's top-k (+ tail) against the student's log-softmax, per position; NLL where no targets.

    Per loss position t with targets: D(teacher_t, student_t) + sft_weight * NLL_t, D chosen by
    cfg.divergence over the k + 1 outcomes (the valid top-k ids, and the tail bucket of everything else);
    per loss position without targets (a row of -1, or no top-k in the batch): NLL_t. Summed, over
    num_global_tokens. Metrics (shares; finalize_metrics turns the distill/* ones into means over positions
    with targets): distill/forward_kl, distill/reverse_kl, distill/topk_mass (the teacher's top-k mass),
    distill/target_fraction, loss/divergence, loss/nll (sampled-token NLL over all loss tokens), loss/tokens.
    """
    cfg = cfg or DistillLossConfig()
    mask = inputs.loss_mask
    n = inputs.num_global_tokens
    nll = -torch.where(mask, inputs.trainer_logprobs, 0.0)
    zeros = torch.zeros_like(nll)
    if inputs.teacher_topk_ids is None:
        has, div, fkl, rkl, mass = torch.zeros_like(mask), zeros, zeros, zeros, zeros
    else:
        valid, p, log_p, q, log_q, mass = _support(inputs)
        has = mask & valid.any(-1)
        div = DIVERGENCES[cfg.divergence](p, log_p, q, log_q, cfg.beta)
        fkl = forward_kl(p, log_p, q.detach(), log_q.detach())
        rkl = reverse_kl(p, log_p, q.detach(), log_q.detach())
    div_sum = torch.where(has, div, 0.0).sum()
    nll_weight = torch.where(has, cfg.sft_weight, 1.0)
    loss = (div_sum + (nll_weight * nll).sum()) / n
    metrics = {
        "distill/forward_kl": torch.where(has, fkl, 0.0).sum() / n,
        "distill/reverse_kl": torch.where(has, rkl, 0.0).sum() / n,
        "distill/topk_mass": torch.where(has, mass, 0.0).sum() / n,
        "distill/target_fraction": has.sum().float() / n,
        "loss/divergence": div_sum.detach() / n,
        "loss/nll": nll.detach().sum() / n,
        "loss/tokens": mask.sum().float(),
    }
    return loss, metrics


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "forward_kl": lambda p, log_p, q, log_q, beta: forward_kl(p, log_p, q, log_q),
    "reverse_kl": lambda p, log_p, q, log_q, beta: reverse_kl(p, log_p, q, log_q),
    "jsd": generalized_jsd,
}
"""trainer.loss.divergence -> (p, log_p, q, log_q, beta) -> [T] divergence per position."""

LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {
    "sft": sft_loss, "rl": rl_loss, "distill": distill_loss,
}  # fmt: skip


def build_loss(cfg: LossConfig) -> LossFn:
    """The loss function for `trainer.loss`, with its config bound."""
    return functools.partial(LOSSES[cfg.type], cfg=cfg)


# distill/* shares summed over the step, turned into means over the positions with top-k targets.
_PER_TARGET = ("distill/forward_kl", "distill/reverse_kl", "distill/topk_mass")


def finalize_metrics(summed: dict[str, float]) -> dict[str, float]:
    """Step metrics from the summed shares: adds loss/ppl where there is a loss/nll; the distill/* divergences
    and mass become means over the positions with targets (dropped when the step had none)."""
    out = dict(summed)
    if "loss/nll" in out:
        out["loss/ppl"] = math.exp(min(out["loss/nll"], 50.0))
    if "distill/target_fraction" in out:
        share = out["distill/target_fraction"]
        for name in _PER_TARGET:
            value = out.pop(name)
            if share > 0:
                out[name] = value / share
    return out
