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
import types
from typing import Any

import torch
import torch.nn.functional as F

from apprentice.trainer.losses import LossFn, LossInputs, Metrics, target_logprobs
from apprentice.trainer.packing import MicroBatch

LOSS_METHOD = "apprentice_micro_batch_loss"
"""Name of the loss method bound on the model by `bind_loss_method` (FSDP2 treats it as a forward)."""

# Config attributes by which some architectures transform h W^T before the softmax.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def full_loss(
    logits: torch.Tensor, target_ids: torch.Tensor, inputs: LossInputs, loss_fn: LossFn
) -> tuple[torch.Tensor, Metrics]:
    """The plain path: logits [T, V] of the whole micro-batch at once (reference, and fallback)."""
    return loss_fn(dataclasses.replace(inputs, trainer_logprobs=target_logprobs(logits, target_ids)))


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
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            h_c = hidden[start:end]
            target_c = target_ids[start:end].unsqueeze(-1)  # [C, 1]
            logits_c = F.linear(h_c, weight, bias).float()  # [C, V]
            picked_c = logits_c.gather(-1, target_c)  # [C, 1]
            # Softmax in place in the one [C, V] fp32 buffer (torch.logsumexp would allocate a second one).
            max_c = logits_c.amax(dim=-1, keepdim=True)
            probs_c = logits_c.sub_(max_c).exp_()
            sum_c = probs_c.sum(dim=-1, keepdim=True)
            probs_c.div_(sum_c)
            lp_c = (picked_c - max_c - sum_c.log()).squeeze(-1)  # [C]
            with torch.enable_grad():
                lp_leaf = lp_c.detach().requires_grad_(True)
                loss_c, metrics_c = loss_fn(dataclasses.replace(inputs.positions(start, end), trainer_logprobs=lp_leaf))
                grads = torch.autograd.grad(loss_c, lp_leaf, allow_unused=True) if loss_c.requires_grad else (None,)
            g_c = torch.zeros_like(lp_c) if grads[0] is None else grads[0].float()  # [C]
            # d loss / d logits = g * (onehot - softmax), built in place over the probabilities.
            grad_logits = probs_c.mul_(-g_c.unsqueeze(-1))
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

    Bound on the model as LOSS_METHOD (see bind_loss_method) so that FSDP2 gathers the root's weights for it.
    """
    inputs = LossInputs(
        trainer_logprobs=torch.empty(0),
        inference_logprobs=mb.inference_logprobs[0],
        loss_mask=mb.loss_mask[0],
        advantages=mb.advantages[0],
        num_global_tokens=num_global_tokens,
    )
    target_ids = mb.target_ids[0]
    if chunk_tokens > 0 and chunkable(model):
        hidden = model.get_decoder()(**mb.model_kwargs()).last_hidden_state[0]  # [T, H]
        head = model.get_output_embeddings()
        return chunked_loss(hidden, head.weight, head.bias, target_ids, inputs, loss_fn, chunk_tokens)
    logits = model(**mb.model_kwargs()).logits[0]  # [T, V]
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
