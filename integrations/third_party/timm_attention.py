"""timm's ``Attention``: recomputed attention matrices (fused attention is bypassed)."""

from __future__ import annotations

import torch
from torch import nn

from ess_reg.operators import DenseOperator


def timm_attention_operator(module: nn.Module, args, kwargs, output) -> DenseOperator:
    """``softmax(q k^T * scale)`` per head ``[B, H, N, N]`` from the module's own ``qkv`` and norms.

    Vision attention is bidirectional, which has no ESS: the call must be causal
    (``is_causal=True``), or the module marked causal with ``module.ess_causal = True``.
    """
    x = args[0] if args else kwargs["x"]
    is_causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
    if not (is_causal or getattr(module, "ess_causal", False)):
        raise ValueError(
            "timm Attention is bidirectional here, and ESS needs a causal operator; call it with "
            "is_causal=True or set module.ess_causal = True if its inputs are causal by construction"
        )
    batch, length, _ = x.shape
    qkv = module.qkv(x).reshape(batch, length, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
    scores = (q * module.scale) @ k.transpose(-2, -1)
    mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
    if mask is not None:
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    return DenseOperator(torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1))
