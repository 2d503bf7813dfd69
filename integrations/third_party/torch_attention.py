"""``torch.nn.MultiheadAttention`` used with a causal mask: its per-head attention matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.operators import DenseOperator


def multihead_attention_operator(module: nn.MultiheadAttention, args, kwargs, output) -> DenseOperator:
    """Recompute the post-softmax weights ``[B, H, L, L]`` of a self-attention call.

    The call must be causal (``is_causal=True`` or a causal ``attn_mask``); a bidirectional call is
    reported by :class:`DenseOperator`'s causality check. Dropout is not applied (eval weights).
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    call = dict(zip(names, args, strict=False)) | kwargs
    query, key, value = call["query"], call["key"], call["value"]
    if module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length = query.shape[0]
    mask = call.get("attn_mask")
    if mask is None and call.get("is_causal", False):
        mask = torch.ones(length, length, dtype=torch.bool, device=query.device).triu(1)
    _, weights = F.multi_head_attention_forward(
        query, key, value, module.embed_dim, module.num_heads, module.in_proj_weight,
        module.in_proj_bias, module.bias_k, module.bias_v, module.add_zero_attn, 0.0,
        module.out_proj.weight, module.out_proj.bias, training=False,
        key_padding_mask=call.get("key_padding_mask"), need_weights=True, attn_mask=mask,
        average_attn_weights=False,
        use_separate_proj_weight=not module._qkv_same_embed_dim,
        q_proj_weight=module.q_proj_weight, k_proj_weight=module.k_proj_weight,
        v_proj_weight=module.v_proj_weight,
    )
    if weights.shape[-1] != weights.shape[-2]:
        raise ValueError("nn.MultiheadAttention: ESS needs self-attention over one sequence "
                         f"(got attention weights of shape {tuple(weights.shape)})")
    return DenseOperator(weights)
