"""The loss of one micro-batch without [T, V] logits: the lm_head, log-softmax and loss, chunk by chunk.

At T = 8192 tokens and a 151,936-token vocabulary, fp32 logits of one micro-batch take 5 GB, and the plain
path (logits -> float -> logsumexp -> loss -> backward) holds several such tensors at once. Here the final
hidden states [T, H] go through the lm_head `chunk` positions at a time, and each chunk is finished before
the next starts:

    logits_c = h_c W^T                     [C, V], fp32 for the softmax
    lp_c     = logits_c[target] - logsumexp(logits_c)
    loss_c   = loss_fn(inputs_c with lp_c)  (every loss is a sum over tokens: see losses.py)
    g_c      = d loss_c / d lp_c           [C], through the loss's own autograd graph (tiny)
    d loss / d logits_c = g_c * (onehot(target) - softmax(logits_c))
    d loss / d h_c = (d loss / d logits_c) W,   d loss / d W += (d loss / d logits_c)^T h_c

With the teacher's top-k (distill loss) the loss also sees the student's logprobs of the k teacher ids S and
the log of its tail mass r = sum of p over ids outside S, read from the same buffer (the mass outside S summed
directly, not 1 - its complement, which float32 rounds to 0 for a confident student). With g_j the loss's
gradients for the gathered logprobs and g_r for log r, G = sum_j g_j + g_r:

    d loss / d logits_v = sum_j g_j [v = j] - p_v G + (g_r / r) p_v [v not in S]

so the gradients for the hidden states and W are complete when the forward ends and backward only scales
them by the incoming gradient (1.0 for the loss itself). That costs the same three matmuls as the plain
path (no recomputation), and peak memory is a few [C, V] buffers plus one [V, H] fp32 gradient accumulator
instead of several [T, V] tensors. Gradients of the logits are cast to the compute dtype before the matmuls,
exactly as autograd does on the plain path.

Models whose logits are more than `h W^T + b` (soft-capping, logit scaling) or whose output head is not a
plain Linear take the plain path through the model's own forward; so does `trainer.logprob_chunk_tokens = 0`.
"""

from __future__ import annotations

import dataclasses
import math
import types
from typing import Any

import torch
import torch.nn.functional as F

from apprentice.trainer.losses import STUDENT_TAIL_FLOOR, LossFn, LossInputs, Metrics, target_logprobs, topk_index
from apprentice.trainer.packing import MicroBatch

LOSS_METHOD = "apprentice_micro_batch_loss"
"""Name of the loss method bound on the model by `bind_loss_method` (FSDP2 treats it as a forward)."""

# Config attributes by which some architectures transform h W^T before the softmax.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def full_loss(
    logits: torch.Tensor, target_ids: torch.Tensor, inputs: LossInputs, loss_fn: LossFn
) -> tuple[torch.Tensor, Metrics]:
    """The plain path: logits [T, V] of the whole micro-batch at once (reference, and fallback)."""
    inputs = dataclasses.replace(inputs, trainer_logprobs=target_logprobs(logits, target_ids))
    if inputs.teacher_topk_ids is not None:
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # [T, V]
        index = topk_index(inputs.teacher_topk_ids, target_ids)
        outside = log_probs.scatter(-1, index, float("-inf"))  # the tail: every id but the valid top-k
        tail = torch.logsumexp(outside, dim=-1).clamp_min(math.log(STUDENT_TAIL_FLOOR))
        inputs = dataclasses.replace(inputs, student_topk_logprobs=log_probs.gather(-1, index),
                                     student_tail_logprobs=tail)  # fmt: skip
    return loss_fn(inputs)


class _ChunkedLoss(torch.autograd.Function):
    """hidden [T, H], weight [V, H], bias [V] | None -> summed loss; gradients computed in the forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        target_ids: torch.Tensor,
        inputs: LossInputs,
        loss_fn: LossFn,
        chunk: int,
        metrics_out: Metrics,
    ) -> torch.Tensor:
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros_like(weight, dtype=torch.float32)
        grad_bias = None if bias is None else torch.zeros_like(bias, dtype=torch.float32)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        teacher_ids = inputs.teacher_topk_ids
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h_c = hidden[start:end]
            target_c = target_ids[start:end].unsqueeze(-1)  # [C, 1]
            logits_c = F.linear(h_c, weight, bias).float()  # [C, V]
            picked_c = logits_c.gather(-1, target_c)  # [C, 1]
            index_c = None if teacher_ids is None else topk_index(teacher_ids[start:end], target_c[:, 0])  # [C, k]
            picked_topk_c = None if index_c is None else logits_c.gather(-1, index_c)  # [C, k]
            # Softmax in place in the one [C, V] fp32 buffer (torch.logsumexp would allocate a second one).
            max_c = logits_c.amax(dim=-1, keepdim=True)
            probs_c = logits_c.sub_(max_c).exp_()
            sum_c = probs_c.sum(dim=-1, keepdim=True)
            probs_c.div_(sum_c)
            log_norm_c = max_c + sum_c.log()  # [C, 1] logsumexp of the logits
            lp_c = (picked_c - log_norm_c).squeeze(-1)  # [C]
            leaves = {"trainer_logprobs": lp_c.detach().requires_grad_(True)}
            if index_c is not None and picked_topk_c is not None:
                probs_topk_c = probs_c.gather(-1, index_c)  # [C, k]
                probs_c.scatter_(-1, index_c, 0.0)  # now p_v [v not in S]; restored below through the gradient
                tail_c = probs_c.sum(-1).clamp_min(STUDENT_TAIL_FLOOR)  # [C]
                leaves["student_topk_logprobs"] = (picked_topk_c - log_norm_c).requires_grad_(True)
                leaves["student_tail_logprobs"] = tail_c.log().requires_grad_(True)
            with torch.enable_grad():
                loss_c, metrics_c = loss_fn(dataclasses.replace(inputs.positions(start, end), **leaves))  # type: ignore[arg-type]
                wrt = list(leaves.values())
                grads = torch.autograd.grad(loss_c, wrt, allow_unused=True) if loss_c.requires_grad else [None] * len(wrt)
            g = [torch.zeros_like(x) if gx is None else gx.float() for x, gx in zip(wrt, grads, strict=True)]
            g_c = g[0]  # [C]
            if index_c is None:
                # d loss / d logits = g * (onehot - softmax), built in place over the probabilities.
                grad_logits = probs_c.mul_(-g_c.unsqueeze(-1))
            else:
                g_topk, g_tail = g[1], g[2]  # [C, k], [C]
                total_g = (g_c + g_topk.sum(-1) + g_tail).unsqueeze(-1)  # [C, 1]
                outside_coef = torch.where(g_tail == 0, 0.0, g_tail / tail_c).unsqueeze(-1) - total_g
                grad_logits = probs_c.mul_(outside_coef)  # ids outside S (entries in S are 0 here)
                grad_logits.scatter_(-1, index_c, -probs_topk_c * total_g)  # ids in S (stand-ins repeat a value)
                grad_logits.scatter_add_(-1, index_c, g_topk)  # 0 on padding
            grad_logits.scatter_add_(-1, target_c, g_c.unsqueeze(-1))
            grad_logits_lp = grad_logits.to(weight.dtype)  # what autograd feeds the lm_head matmul backward
            grad_hidden[start:end] = grad_logits_lp @ weight
            if weight.dtype == torch.float32:
                grad_weight.addmm_(grad_logits_lp.t(), h_c)
            else:
                grad_weight += grad_logits_lp.t() @ h_c
            if grad_bias is not None:
                grad_bias += grad_logits_lp.sum(0).float()
            total += loss_c.detach().float()
            for name, value in metrics_c.items():
                metrics_out[name] = metrics_out[name] + value.detach() if name in metrics_out else value.detach()
            # Free this chunk's [C, V] buffers before the next chunk's logits are allocated.
            del logits_c, probs_c, grad_logits, grad_logits_lp
        ctx.has_bias = bias is not None
        ctx.save_for_backward(grad_hidden, grad_weight, *([] if grad_bias is None else [grad_bias]))
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        # Scaled in place: the graph is used once (no retain_graph), and autograd can then adopt the buffers
        # as .grad without another [V, H] copy.
        saved = ctx.saved_tensors
        grad_hidden = saved[0].mul_(grad_total.to(saved[0].dtype))
        grad_weight = saved[1].mul_(grad_total).to(ctx.dtypes[0])
        grad_bias = saved[2].mul_(grad_total).to(ctx.dtypes[1]) if ctx.has_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    target_ids: torch.Tensor,
    inputs: LossInputs,
    loss_fn: LossFn,
    chunk: int,
) -> tuple[torch.Tensor, Metrics]:
    """Loss and metrics of `loss_fn` over hidden [T, H] through the head (weight [V, H], bias [V]), by chunks.

    target_ids [T]. Same values and gradients as `full_loss(F.linear(hidden, weight, bias), ...)`; call
    backward once.
    """
    metrics: Metrics = {}
    loss = _ChunkedLoss.apply(hidden, weight, bias, target_ids, inputs, loss_fn, chunk, metrics)
    return loss, metrics


def chunkable(model: torch.nn.Module) -> bool:
    """The model's logits are exactly `output_embeddings(decoder(...))` with a plain Linear head."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    transformed = any(getattr(config, name, None) not in (None, 1.0) for name in _LOGIT_TRANSFORMS)
    return isinstance(head, torch.nn.Linear) and hasattr(model, "get_decoder") and not transformed


def micro_batch_loss(
    model: Any, mb: MicroBatch, loss_fn: LossFn, num_global_tokens: int, chunk_tokens: int
) -> tuple[torch.Tensor, Metrics]:
    """(loss, metrics) of one packed micro-batch (already on the model's device); backward the loss once.

    The lm_head and the loss see only the trained positions: every loss is a sum over loss-mask tokens (see
    losses.py), so the others (prompts, tool results: two thirds of an RL batch of short answers) would only
    cost a [V, H] matmul each, forward and backward, for nothing. A row without any trained position keeps
    one (masked) position so that backward still runs through the whole model (FSDP's collectives need it).

    Bound on the model as LOSS_METHOD (see bind_loss_method) so that FSDP2 gathers the root's weights for it.
    """
    inputs = LossInputs(
        trainer_logprobs=torch.empty(0),
        inference_logprobs=mb.inference_logprobs[0],
        loss_mask=mb.loss_mask[0],
        advantages=mb.advantages[0],
        num_global_tokens=num_global_tokens,
        teacher_topk_ids=None if mb.teacher_topk_ids is None else mb.teacher_topk_ids[0],
        teacher_topk_logprobs=None if mb.teacher_topk_logprobs is None else mb.teacher_topk_logprobs[0],
    )
    trained = mb.loss_mask[0].nonzero().squeeze(-1)  # [N] positions whose target is trained
    if trained.numel() == 0:
        trained = trained.new_zeros(1)
    inputs = inputs.select(trained)
    target_ids = mb.target_ids[0].index_select(0, trained)
    if chunk_tokens > 0 and chunkable(model):
        hidden = model.get_decoder()(**mb.model_kwargs()).last_hidden_state[0].index_select(0, trained)  # [N, H]
        head = model.get_output_embeddings()
        return chunked_loss(hidden, head.weight, head.bias, target_ids, inputs, loss_fn, chunk_tokens)
    logits = model(**mb.model_kwargs(), logits_to_keep=trained).logits[0]  # [N, V]
    return full_loss(logits, target_ids, inputs, loss_fn)


def bind_loss_method(model: torch.nn.Module) -> None:
    """Give `model` the method LOSS_METHOD = micro_batch_loss, and make FSDP2 treat it as a forward.

    FSDP2 gathers the root module's weights (embeddings, final norm, lm_head) only around a forward call; the
    chunked path calls the decoder and the head weight directly, so the method is registered as a forward.
    Call after fully_shard (a no-op registration for a model that is not sharded).
    """
    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, LOSS_METHOD, types.MethodType(micro_batch_loss, model))
    register_fsdp_forward_method(model, LOSS_METHOD)
