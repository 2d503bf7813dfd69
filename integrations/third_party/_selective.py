"""Shared rebuilding of Mamba-style selective SSM operators from captured inputs (private)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.operators import DiagonalRealization


def depthwise_causal_conv(x: torch.Tensor, conv: nn.Conv1d) -> torch.Tensor:
    """``[B, D, L]`` through a depthwise ``Conv1d`` with left padding ``k - 1``, truncated to ``L``."""
    length = x.shape[-1]
    return F.conv1d(x, conv.weight, conv.bias, padding=conv.kernel_size[0] - 1,
                    groups=conv.groups)[..., :length]


def selective_operator(u: torch.Tensor, x_proj: nn.Linear, dt_weight: torch.Tensor,
                       dt_bias: torch.Tensor, A_log: torch.Tensor, dt_rank: int,
                       state: int) -> DiagonalRealization:
    """Mamba-1 operator per channel from ``u: [B, L, D]`` (after conv and activation):
    ``delta, B, C = x_proj(u)``, ``dt = softplus(W_dt delta + b_dt)``, ``A = -exp(A_log)``."""
    step, B, C = torch.split(x_proj(u), [dt_rank, state, state], dim=-1)
    dt = F.softplus(step @ dt_weight.T + dt_bias).transpose(1, 2)[..., None]  # [B, D, L, 1]
    A = -torch.exp(A_log.float()).to(dt.dtype)
    batch, length, channels = u.shape
    shape = (batch, channels, length, state)
    return DiagonalRealization(C[:, None].expand(shape), dt * B[:, None], dt * A[None, :, None, :])
