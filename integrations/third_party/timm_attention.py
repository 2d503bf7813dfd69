"""timm's ``Attention``: recomputed attention matrices (fused attention is bypassed).

Vision transformers attend in both directions, which has no effective state size. A call with
``is_causal=True`` (or a causal boolean ``attn_mask``) is measured; any other call is left out
with a warning (:class:`ess_reg.NotCausalError`), never replaced by a causal-masked matrix the layer
does not compute. Regularizers and ``ess_init`` leave timm ``Attention`` layers out at construction
unless the module is marked ``module.ess_causal = True`` (it is called with ``is_causal=True``).
"""

from __future__ import annotations

import torch
from torch import nn

from ess_reg.capture import Capture
from ess_reg.operators import DenseOperator, NotCausalError


def timm_attention_bidirectional(module: nn.Module) -> str | None:
    """Why a timm ``Attention`` counts as bidirectional before any call (None when marked causal)."""
    if getattr(module, "ess_causal", False):
        return None
    return ("timm Attention attends both ways, as in vision transformers; if this layer is called "
            "with is_causal=True, set module.ess_causal = True")


def timm_attention_operator(module: nn.Module, args, kwargs, output) -> Capture:
    """``softmax(q k^T * scale)`` per head ``[B, H, N, N]`` of a causal call, from the module's own
    ``qkv`` and norms."""
    x = args[0] if args else kwargs["x"]
    is_causal = kwargs.get("is_causal", args[2] if len(args) > 2 else False)
    mask = kwargs.get("attn_mask", args[1] if len(args) > 1 else None)
    batch, length, _ = x.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
    masked_causally = mask is not None and _masks_the_future(mask, causal)
    if not (is_causal or masked_causally):
        raise NotCausalError("timm Attention was called without is_causal=True or a causal mask, so "
                             "it attends to later tokens; ESS needs a causal operator")
    qkv = module.qkv(x).reshape(batch, length, 3, module.num_heads, module.head_dim).permute(2, 0, 3, 1, 4)
    q, k = module.q_norm(qkv[0]), module.k_norm(qkv[1])
    scores = (q * module.scale) @ k.transpose(-2, -1)
    if mask is not None and not is_causal:  # timm: is_causal takes precedence over a mask
        scores = scores.masked_fill(~mask, -torch.inf) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # [B, H, N, hd] -> the layer's output
        merged = getattr(module, "norm", nn.Identity())(mixed.transpose(1, 2).reshape(batch, length, -1))
        gate = getattr(module, "gate", None)  # timm's optional output gate
        return module.proj(merged if gate is None else merged * gate(x).sigmoid())

    return Capture(DenseOperator(weights), qkv[2], output, readout)


def _masks_the_future(mask: torch.Tensor, causal: torch.Tensor) -> bool:
    """Whether an ``attn_mask`` (boolean: True attends; additive: ``-inf`` blocks) hides every
    later token."""
    future = ~causal.expand_as(mask)
    if mask.dtype == torch.bool:
        return not bool(mask[future].any())
    return bool(torch.isneginf(mask[future]).all())
