"""Projection initializations through timm's helpers."""

from __future__ import annotations

import torch
from timm.layers import lecun_normal_, trunc_normal_
from torch import nn


@torch.no_grad()
def projections_(module: nn.Module, mode: str = "trunc_normal", std: float = 0.02) -> nn.Module:
    """Re-initialize every ``nn.Linear`` in ``module``: ``"trunc_normal"`` (timm ``trunc_normal_``, cut
    at 2 ``std``; biases 0) or ``"lecun"`` (timm ``lecun_normal_``, biases 0)."""
    if mode not in ("trunc_normal", "lecun"):
        raise ValueError(f"mode must be 'trunc_normal' or 'lecun', got {mode!r}")
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            if mode == "trunc_normal":
                trunc_normal_(layer.weight, std=std, a=-2 * std, b=2 * std)
            else:
                lecun_normal_(layer.weight)
            if layer.bias is not None:
                layer.bias.zero_()
    return module
