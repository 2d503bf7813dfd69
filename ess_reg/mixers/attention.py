"""``"sa"``: causal multi-head softmax attention with rotary position embeddings."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import merge_heads, split_heads
from ess_reg.mixers.base import SequenceMixer
from ess_reg.operators import SoftmaxAttentionOperator


def rotary(x: torch.Tensor, base: float = 10_000.0) -> torch.Tensor:
    """Rotate pairs of ``x: [B, H, L, d]`` by position-dependent angles (RoPE, half-split layout)."""
    length, dim = x.shape[-2], x.shape[-1]
    half = dim // 2
    freq = base ** (-torch.arange(half, device=x.device, dtype=torch.float32) / half)
    angle = torch.arange(length, device=x.device, dtype=torch.float32)[:, None] * freq
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    first, second = x[..., :half], x[..., half: 2 * half]
    rotated = torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    return torch.cat([rotated, x[..., 2 * half:]], dim=-1)


class SoftmaxAttention(SequenceMixer):
    """Causal softmax attention; ``T_h = softmax(q k^T / sqrt(d) + causal mask)`` per head.

    The forward uses ``scaled_dot_product_attention``; the operator is the attention matrix
    (a :class:`DenseOperator`, no finite state). ``u`` is the values ``[B, H, L, d]``.
    """

    name = "sa"

    def __init__(self, d_model: int, num_heads: int = 4, rope: bool = True) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model, self.num_heads, self.rope = d_model, num_heads, rope
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)

    @property
    def state_size(self) -> None:
        return None

    def featurize(self, x):
        q, k, v = (split_heads(t, self.num_heads) for t in self.qkv(x).chunk(3, dim=-1))
        if self.rope:
            q, k = rotary(q), rotary(k)
        return {"q": q, "k": k, "u": v}

    def mix(self, f):
        return F.scaled_dot_product_attention(f["q"], f["k"], f["u"], is_causal=True)

    def build_operator(self, f):
        # formed on demand, for the heads asked about: the forward itself never forms T
        return SoftmaxAttentionOperator(f["q"], f["k"])

    def readout(self, f, y):
        return self.out(merge_heads(y))
