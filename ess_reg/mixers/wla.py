"""``"wla"``: weighted linear attention, a learned input-independent per-feature decay."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import (
    HeadRMSNorm,
    ShortConv,
        inverse_softplus,
    merge_heads,
    split_heads,
)
from ess_reg.mixers.base import RealizationMixer


class WeightedLinearAttention(RealizationMixer):
    """``S_i = diag(a) S_{i-1} + k_i v_i^T``, ``y_i = S_i^T q_i / sqrt(K)``, ``a in (0, 1)^K`` learned.

    ``T_h[i, j] = q_i^T diag(a^{i-j}) k_j / sqrt(K)``. The decay ``a = exp(-softplus(w))`` is one
    vector per head, the same at every step and for every input. Initialized log-uniformly so the
    memory ``1 / (1 - a)`` spans ``decay_range`` tokens. TSS per head: ``K``.
    """

    name = "wla"

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        head_k_dim: int | None = None,
        short_conv: bool = True,
        decay_range: tuple[float, float] = (4.0, 256.0),
    ) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = d_model // num_heads
        self.key_dim = head_k_dim or self.head_dim
        key_width = num_heads * self.key_dim
        self.q = nn.Linear(d_model, key_width, bias=False)
        self.k = nn.Linear(d_model, key_width, bias=False)
        self.v = nn.Linear(d_model, d_model, bias=False)
        self.conv = ShortConv(2 * key_width + d_model) if short_conv else None
        low, high = decay_range
        memory = torch.exp(torch.empty(num_heads, self.key_dim).uniform_(math.log(low), math.log(high)))
        self.decay_logit = nn.Parameter(inverse_softplus(1.0 / memory))  # -log a ~ 1/memory
        self.norm = HeadRMSNorm(self.head_dim)
        self.out = nn.Linear(d_model, d_model, bias=False)

    @property
    def state_size(self) -> int:
        return self.key_dim

    def log_decay(self) -> torch.Tensor:
        """``log a = -softplus(w)``: ``[H, K]``."""
        return -F.softplus(self.decay_logit)

    def featurize(self, x):
        qkv = torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)
        if self.conv is not None:
            qkv = self.conv(qkv)
        width = self.num_heads * self.key_dim
        q, k, v = qkv.split([width, width, self.d_model], dim=-1)
        q, k = split_heads(q, self.num_heads), split_heads(k, self.num_heads)
        log_decay = self.log_decay()[None, :, None, :].expand(q.shape)
        return {"c": q * self.key_dim ** -0.5, "b": k, "log_decay": log_decay,
                "u": split_heads(v, self.num_heads)}




    def readout(self, f, y):
        return self.out(merge_heads(self.norm(y)))
