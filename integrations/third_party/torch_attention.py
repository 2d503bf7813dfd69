"""``torch.nn.MultiheadAttention`` used with a causal mask: its per-head attention matrices."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.capture import Capture, checking
from ess_reg.operators import DenseOperator, NotCausalError


def multihead_attention_operator(module: nn.MultiheadAttention, args, kwargs,
                                 output) -> DenseOperator | Capture:
    """Recompute the post-softmax weights ``[B, H, L, L]`` of a self-attention call.

    The call must be causal (``is_causal=True`` or a causal ``attn_mask``); a bidirectional call is
    reported by :class:`DenseOperator`'s causality check. Dropout is not applied (eval weights).
    """
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask",
             "average_attn_weights", "is_causal")
    call = dict(zip(names, args, strict=False)) | kwargs
    query, key, value = call["query"], call["key"], call["value"]
    if module.batch_first and query.dim() == 3:  # torch transposes batched inputs only
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    length = query.shape[0]
    if key.shape[0] != length or module.bias_k is not None or module.add_zero_attn:
        raise NotCausalError("nn.MultiheadAttention attends to another sequence (cross-attention) or "
                             "to added bias / zero keys: not a causal operator over one sequence")
    mask = call.get("attn_mask")
    if mask is None:  # is_causal=True alone is only a hint: torch's fast path may ignore it
        raise NotCausalError(
            "nn.MultiheadAttention was called without attn_mask, so it may attend to later tokens "
            "(is_causal=True alone is a hint torch can ignore); pass "
            "attn_mask=nn.Transformer.generate_square_subsequent_mask(L) for a causal layer")
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
    # checked here (on the CPU: no host sync on a device) to say how to fix it
    if weights.device.type == "cpu" and bool(weights.triu(1).ne(0).any()):
        raise NotCausalError(
            "nn.MultiheadAttention was called without a causal mask, so it attends to later tokens "
            "and ESS (which needs a causal operator) does not apply; call it with "
            "attn_mask=nn.Transformer.generate_square_subsequent_mask(L) (and is_causal=True) if the "
            "layer is meant to be causal, or leave it out with modules=")
    if value.dim() == 2 or not checking():  # the Capture only for check_capture (and batched calls)
        return DenseOperator(weights)
    heads, width = module.num_heads, module.embed_dim
    if module._qkv_same_embed_dim:
        w_v = module.in_proj_weight[2 * width:]
    else:
        w_v = module.v_proj_weight
    b_v = None if module.in_proj_bias is None else module.in_proj_bias[2 * width:]
    batch = value.shape[1]
    v = F.linear(value, w_v, b_v).view(length, batch, heads, width // heads).permute(1, 2, 0, 3)

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # [B, H, L, hd] -> the layer's output
        out = module.out_proj(mixed.permute(2, 0, 1, 3).reshape(length, batch, width))
        return out.transpose(0, 1) if module.batch_first else out

    return Capture(DenseOperator(weights), v, output[0], readout)
