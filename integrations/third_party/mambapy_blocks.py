"""mambapy's ``MambaBlock`` (Mamba-1 in pure PyTorch)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from ess_reg.capture import Capture, checking
from ess_reg.operators import DiagonalRealization
from integrations.third_party._selective import depthwise_causal_conv, selective_operator


def mambapy_block_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization | Capture:
    """Rebuilt from the block's input: ``u = silu(conv(in_proj(x)[:D]))``; ``dt_proj`` is applied
    through its weight in mambapy, so ``dt`` is recomputed (the ``D`` skip and gate are outside T)."""
    x = args[0] if args else kwargs["x"]
    operator = mambapy_operator_from_input(module, x)
    if not checking():
        return operator
    u = mambapy_inner_input(module, x).transpose(1, 2)[..., None]  # [B, D, L, 1]
    gate = F.silu(module.in_proj(x).chunk(2, dim=-1)[1])  # [B, L, D]

    def readout(mixed):  # T u [B, D, L, 1] -> the block's output
        y = (mixed + module.D[None, :, None, None] * u)[..., 0].transpose(1, 2)
        return module.out_proj(y * gate)

    return Capture(operator, u, output, readout)


def mambapy_inner_input(module: nn.Module, x):
    """``u: [B, L, D]`` for a block input ``x: [B, L, d_model]``."""
    xs, _ = module.in_proj(x).chunk(2, dim=-1)
    return F.silu(depthwise_causal_conv(xs.transpose(1, 2), module.conv1d)).transpose(1, 2)


def mambapy_operator_from_input(module: nn.Module, x) -> DiagonalRealization:
    config = module.config
    return selective_operator(mambapy_inner_input(module, x), module.x_proj, module.dt_proj.weight,
                              module.dt_proj.bias, module.A_log, config.dt_rank, config.d_state)
