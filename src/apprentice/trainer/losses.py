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

from apprentice.config.trainer import LossConfig, RLLossConfig, SFTLossConfig

# Log ratios beyond this are already far outside any trust region; clamping keeps exp() finite in metrics.
_MAX_LOG_RATIO = 20.0


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


LOSSES: dict[str, Callable[..., tuple[torch.Tensor, Metrics]]] = {"sft": sft_loss, "rl": rl_loss}


def build_loss(cfg: LossConfig) -> LossFn:
    """The loss function for `trainer.loss`, with its config bound."""
    return functools.partial(LOSSES[cfg.type], cfg=cfg)


def finalize_metrics(summed: dict[str, float]) -> dict[str, float]:
    """Step metrics from the summed shares: adds loss/ppl where there is a loss/nll."""
    out = dict(summed)
    if "loss/nll" in out:
        out["loss/ppl"] = math.exp(min(out["loss/nll"], 50.0))
    return out
