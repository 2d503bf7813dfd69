"""``"s6"``: Mamba-1 style selective SSM (per-channel diagonal ``A``, input-dependent ``dt, B, C``)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import ShortConv, dt_bias_init
from ess_reg.mixers.base import RealizationMixer


class SelectiveSSM(RealizationMixer):
    """Mamba-1 / S6 block: per channel ``d`` of ``d_inner = expand * d_model``,

    ``h_i = exp(dt_{i,d} A_d) h_{i-1} + dt_{i,d} B_i u_{i,d}``, ``y_{i,d} = C_i . h_i + D_d u_{i,d}``,
    then ``y * silu(z)`` and the output projection. ``u = silu(conv(x))``; ``dt = softplus(W_dt
    x_proj(u) + b_dt)``; ``B``, ``C`` from ``x_proj(u)`` shared by all channels. Initialization as in
    Mamba: ``A = -(1 .. N)`` (S4D-Real), ``D = 1``, ``dt`` log-uniform in ``[dt_min, dt_max]`` (floor
    ``dt_init_floor``) through an inverse-softplus bias. The operator is per channel (``C = d_inner``,
    ``P = 1``) without the ``D`` skip; TSS per channel: ``N = d_state``.
    """

    name = "s6"

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        dt_rank: int | str = "auto",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = ShortConv(self.d_inner, d_conv)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        with torch.no_grad():
            bound = self.dt_rank ** -0.5
            self.dt_proj.weight.uniform_(-bound, bound)
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor))

    @property
    def state_size(self) -> int:
        return self.d_state

    def featurize(self, x):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(xs))  # [B, L, D_in]
        delta, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(delta)).transpose(1, 2)[..., None]  # [B, D_in, L, 1]
        A = -torch.exp(self.A_log)  # [D_in, N]
        batch, length = x.shape[:2]
        shape = (batch, self.d_inner, length, self.d_state)
        return {
            "c": C[:, None].expand(shape),
            "b": dt * B[:, None],
            "log_decay": dt * A[None, :, None, :],
            "u": u.transpose(1, 2)[..., None],
            "z": z,
        }

    def readout(self, f, y):
        y = (y + self.D[:, None, None] * f["u"])[..., 0].transpose(1, 2)  # [B, L, D_in]
        return self.out_proj(y * F.silu(f["z"]))
