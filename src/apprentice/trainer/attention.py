"""Per-sample ("varlen") causal attention for packed rows, usable on any device.

Registered with transformers as the attention implementation "apprentice_varlen". It is not in transformers'
mask registry, so the model builds no [T, T] mask at all; instead each sample's slice of the packed row
(boundaries from the `cu_seq_lens_q` kwarg, see packing.MicroBatch.model_kwargs) runs through PyTorch's
scaled_dot_product_attention with a causal mask. Cost is sum(L_i^2) instead of the T^2 of a block-diagonal
mask, which is what makes packing pay off on CPU. On GPU, flash_attention_2 consumes the same kwargs natively.

Shared prompts (packing's `prefix_of`, only this implementation reads it): a segment that continues a shared
prefix attends to the prefix's keys and values, then to its own causally (query i of an L-token segment after
a P-token prefix sees keys 0..P+i, the lower-right causal mask), exactly what it would see in its own sample.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from apprentice.trainer.packing import PREFIX_KWARG

NAME = "apprentice_varlen"


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [B, Hq, T, D], key/value [B, Hkv, T, D] -> output [B, T, Hq, D].

    Without `cu_seq_lens_q` (e.g. generation with a cache) it is plain causal sdpa over each row.
    """
    cu = kwargs.get("cu_seq_lens_q")
    gqa = query.shape[1] != key.shape[1]
    if cu is None or query.shape[2] != key.shape[2]:
        causal = attention_mask is None and query.shape[2] == key.shape[2]
        mask = None if attention_mask is None else attention_mask[:, :, :, : key.shape[2]]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, is_causal=causal, scale=scaling, dropout_p=dropout, enable_gqa=gqa
        )
        return out.transpose(1, 2).contiguous(), None
    bounds = cu.tolist()
    prefix_of: list[int] = kwargs.get(PREFIX_KWARG) or [-1] * (len(bounds) - 1)
    pieces = []
    for s, e, owner in zip(bounds[:-1], bounds[1:], prefix_of, strict=True):
        if e <= s:
            continue
        if owner < 0:
            pieces.append(F.scaled_dot_product_attention(
                query[:, :, s:e], key[:, :, s:e], value[:, :, s:e],
                is_causal=True, scale=scaling, dropout_p=dropout, enable_gqa=gqa,
            ))  # fmt: skip
            continue
        ps, pe = bounds[owner], bounds[owner + 1]
        keys = torch.cat([key[:, :, ps:pe], key[:, :, s:e]], dim=2)
        values = torch.cat([value[:, :, ps:pe], value[:, :, s:e]], dim=2)
        visible = torch.ones(e - s, keys.shape[2], dtype=torch.bool, device=query.device).tril(pe - ps)
        pieces.append(F.scaled_dot_product_attention(
            query[:, :, s:e], keys, values, attn_mask=visible, scale=scaling, dropout_p=dropout, enable_gqa=gqa,
        ))  # fmt: skip
    out = torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0]
    return out.transpose(1, 2).contiguous(), None


def register() -> str:
    """Register the implementation with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention_forward)
    return NAME
