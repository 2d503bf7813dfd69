"""``"gla"``: gated linear attention (input-dependent diagonal decay)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import HeadRMSNorm, ShortConv, merge_heads, split_heads
from ess_reg.mixers._settings import SavedSettings, ScalarSetting
from ess_reg.mixers.base import RealizationMixer


class GatedLinearAttention(SavedSettings, RealizationMixer):
    """GLA (Yang et al.): ``S_t = diag(alpha_t) S_{t-1} + k_t v_t^T``, ``y_t = S_t^T q_t / sqrt(K)``.

    ``log alpha_t = logsigmoid(W_2 W_1 x_t + b) / gate_logit_normalizer`` (low-rank gate, default
    normalizer 16), optionally clamped below at ``clamp_min``. Output: per-head RMSNorm times
    ``swish(g_proj x)``, then the output projection. TSS per head: ``K = expand_k * d_model / H``.
    """

    name = "gla"
    gate_logit_normalizer = ScalarSetting()

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank_dim: int = 16,
        gate_logit_normalizer: float = 16.0,
        clamp_min: float | None = None,
        short_conv: bool = True,
    ) -> None:
        super().__init__()
        key_width, value_width = int(d_model * expand_k), int(d_model * expand_v)
        if key_width % num_heads or value_width % num_heads:
            raise ValueError(
                f"d_model * expand_k ({key_width}) and d_model * expand_v ({value_width}) must be "
                f"divisible by num_heads ({num_heads})"
            )
        self.d_model, self.num_heads = d_model, num_heads
        self.key_width, self.value_width = key_width, value_width
        self.key_dim, self.value_dim = key_width // num_heads, value_width // num_heads
        self.gate_logit_normalizer = gate_logit_normalizer  # saved in state_dict
        self.clamp_min = clamp_min
        self.q = nn.Linear(d_model, key_width, bias=False)
        self.k = nn.Linear(d_model, key_width, bias=False)
        self.v = nn.Linear(d_model, value_width, bias=False)
        self.gate = nn.Sequential(nn.Linear(d_model, gate_low_rank_dim, bias=False),
                                  nn.Linear(gate_low_rank_dim, key_width, bias=True))
        self.conv = ShortConv(2 * key_width + value_width) if short_conv else None
        self.g = nn.Linear(d_model, value_width, bias=False)
        self.norm = HeadRMSNorm(self.value_dim)
        self.out = nn.Linear(value_width, d_model, bias=False)

    @property
    def state_size(self) -> int:
        return self.key_dim

    def featurize(self, x):
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        if self.conv is not None:
            qkv = self.conv(qkv)
        q, k, v = qkv.split([self.key_width, self.key_width, self.value_width], dim=-1)
        log_gate = F.logsigmoid(self.gate(x)) / self.gate_logit_normalizer
        if self.clamp_min is not None:
            log_gate = log_gate.clamp_min(self.clamp_min)
        heads = self.num_heads
        return {
            "c": split_heads(q, heads) * self.key_dim ** -0.5,
            "b": split_heads(k, heads),
            "log_decay": split_heads(log_gate, heads),
            "u": split_heads(v, heads),
            "gate": self.g(x),
        }

    def readout(self, f, y):
        return self.out(merge_heads(self.norm(y)) * F.silu(f["gate"]))
