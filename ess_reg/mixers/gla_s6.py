"""``"gla_s6"``: the S6 block with GLA's featurization of the step (a GLA-S6 hybrid)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import ShortConv
from ess_reg.mixers._settings import SavedSettings, ScalarSetting
from ess_reg.mixers.base import RealizationMixer


class GatedSelectiveSSM(SavedSettings, RealizationMixer):
    """GLA-S6 hybrid: S6's state, GLA's gate.

    Per channel ``d`` of ``d_inner = expand * d_model``:
    ``h_i = exp(-s_{i,d} a_d) * h_{i-1} + B_i u_{i,d}``, ``y_{i,d} = C_i . h_i + D_d u_{i,d}``, then
    ``y * silu(z)`` and the output projection, as in S6 (``u = silu(conv(x))``; ``B``, ``C`` shared by
    all channels; ``a_d = exp(A_log_d) = 1 .. N`` at initialization). The step is featurized the GLA
    way: ``s_i = -logsigmoid(W_2 W_1 u_i + b) / alpha`` (a low-rank gate divided by the normalization
    factor ``alpha = gate_logit_normalizer``, 16 by default as in GLA), and, unlike S6, it only sets
    the forgetting: the write is ``B_i u_i``, not ``s_i B_i u_i``. So one quantity no longer controls
    both how much the state takes in and how fast it forgets, and ``alpha`` sets the memory length.

    The paper's GLA-S6 formula is not public; this is the hybrid ess-reg defines and studies under
    that name (``docs/init.md``). The operator is per channel (``C = d_inner``, ``P = 1``) without the
    ``D`` skip; TSS per channel: ``N = d_state``.
    """

    name = "gla_s6"
    gate_logit_normalizer = ScalarSetting()

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        expand: int = 2,
        d_conv: int = 4,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
    ) -> None:
        super().__init__()
        self.d_model, self.d_state = d_model, d_state
        self.d_inner = expand * d_model
        self.gate_logit_normalizer = gate_logit_normalizer  # saved in state_dict
        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv = ShortConv(self.d_inner, d_conv)
        self.x_proj = nn.Linear(self.d_inner, 2 * d_state, bias=False)
        self.gate = nn.Sequential(nn.Linear(self.d_inner, gate_low_rank_dim, bias=False),
                                  nn.Linear(gate_low_rank_dim, self.d_inner, bias=True))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32))
                                  .repeat(self.d_inner, 1))
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        with torch.no_grad():
            self.gate[1].bias.zero_()

    @property
    def state_size(self) -> int:
        return self.d_state

    def featurize(self, x):
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv(xs))  # [B, L, D_in]
        B, C = self.x_proj(u).split([self.d_state, self.d_state], dim=-1)
        log_gate = F.logsigmoid(self.gate(u)) / self.gate_logit_normalizer  # [B, L, D_in], <= 0
        rate = torch.exp(self.A_log)  # [D_in, N]
        batch, length = x.shape[:2]
        shape = (batch, self.d_inner, length, self.d_state)
        return {
            "c": C[:, None].expand(shape),
            "b": B[:, None].expand(shape),
            "log_decay": log_gate.transpose(1, 2)[..., None] * rate[None, :, None, :],
            "u": u.transpose(1, 2)[..., None],
            "z": z,
        }

    def readout(self, f, y):
        y = (y + self.D[:, None, None] * f["u"])[..., 0].transpose(1, 2)  # [B, L, D_in]
        return self.out_proj(y * F.silu(f["z"]))
