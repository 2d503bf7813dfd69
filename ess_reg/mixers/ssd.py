"""``"ssd"``: Mamba-2 style heads with one scalar decay per head and step (state space duality)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import (
    HeadRMSNorm,
    ShortConv,
    dt_bias_init,
    merge_heads,
    split_heads,
)
from ess_reg.mixers.base import RealizationMixer


class StateSpaceDuality(RealizationMixer):
    """Mamba-2 block: ``T_h[i, j] = (C_i . B_j) exp(a_h sum_{m=j+1..i} dt_{m,h}) dt_{j,h}``.

    ``in_proj`` gives ``z``, ``xBC`` and ``dt``; ``xBC`` passes a causal depthwise conv and SiLU;
    ``dt = softplus(dt + dt_bias)``; ``a_h = -exp(A_log_h)`` with ``A_h ~ U(A_init_range)``. The
    output adds ``D_h x``, then a gated RMSNorm ``norm(y * silu(z))`` and ``out_proj``. One group of
    ``B``/``C`` shared by all heads. The operator is per head (``P = headdim`` value channels,
    scalar decay ``[B, H, L, 1]``); TSS per head: ``N = d_state``.
    """

    name = "ssd"

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        headdim: int = 16,
        d_conv: int = 4,
        A_init_range: tuple[float, float] = (1.0, 16.0),
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be divisible by headdim ({headdim})")
        self.headdim, self.num_heads = headdim, self.d_inner // headdim
        conv_width = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + conv_width + self.num_heads, bias=False)
        self.conv = ShortConv(conv_width, d_conv)
        low, high = A_init_range
        self.A_log = nn.Parameter(torch.log(torch.empty(self.num_heads).uniform_(low, high)))
        self.dt_bias = nn.Parameter(dt_bias_init(self.num_heads, dt_min, dt_max, dt_init_floor))
        self.D = nn.Parameter(torch.ones(self.num_heads))
        self.norm = HeadRMSNorm(self.d_inner)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    @property
    def state_size(self) -> int:
        return self.d_state

    def featurize(self, x):
        z, xbc, dt = self.in_proj(x).split(
            [self.d_inner, self.d_inner + 2 * self.d_state, self.num_heads], dim=-1)
        xbc = F.silu(self.conv(xbc))
        xs, B, C = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias).transpose(1, 2)[..., None]  # [B, H, L, 1]
        a = -torch.exp(self.A_log)[None, :, None, None]
        batch, length = x.shape[:2]
        shape = (batch, self.num_heads, length, self.d_state)
        return {
            "c": C[:, None].expand(shape),
            "b": dt * B[:, None],
            "log_decay": dt * a,
            "u": split_heads(xs, self.num_heads),
            "z": z,
        }




    def readout(self, f, y):
        y = merge_heads(y + self.D[:, None, None] * f["u"])
        return self.out_proj(self.norm(y * F.silu(f["z"])))
