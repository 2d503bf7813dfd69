"""``"hyena"``: gated long convolution with an implicit, exponentially windowed filter."""

from __future__ import annotations

import math

import torch
from torch import nn

from ess_reg.mixers._kernels import ShortConv, fft_causal_conv
from ess_reg.mixers.base import SequenceMixer
from ess_reg.operators import DenseOperator


class _Sin(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.freq = nn.Parameter(torch.ones(1, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sin(self.freq * x)


class Hyena(SequenceMixer):
    """Order-2 Hyena: ``y = x2 * (h * (x1 * v) + bias * (x1 * v))`` per channel.

    ``in_proj`` gives ``x1, x2, v`` after a short depthwise conv (kernel 3). The filter
    ``h_c(t) = MLP(z_t)_c exp(-|delta_c| t)`` comes from positional features ``z_t`` (time plus
    sin/cos bands) through a sine-activated MLP, windowed by decays spread over the channels. The
    forward convolves by FFT; the operator is
    ``T_c = diag(x2_c) [Toeplitz(h_c) + diag(bias_c)] diag(x1_c)`` acting on ``u = v`` (dense, no
    finite state).
    """

    name = "hyena"

    def __init__(self, d_model: int, filter_order: int = 64, emb_dim: int = 5, short_kernel: int = 3,
                 max_len: int = 4096) -> None:
        super().__init__()
        if emb_dim < 3 or emb_dim % 2 == 0:
            raise ValueError(f"emb_dim must be odd and >= 3 (time plus sin/cos bands), got {emb_dim}")
        self.d_model, self.emb_dim, self.max_len = d_model, emb_dim, max_len
        self.in_proj = nn.Linear(d_model, 3 * d_model)
        self.short = ShortConv(3 * d_model, short_kernel)
        self.filter = nn.Sequential(
            nn.Linear(emb_dim, filter_order), _Sin(filter_order),
            nn.Linear(filter_order, filter_order), _Sin(filter_order),
            nn.Linear(filter_order, d_model, bias=False),
        )
        target = 1e-2
        self.register_buffer("decay", torch.linspace(math.log(target) / 1.5, math.log(target) / 0.3,
                                                     d_model).abs())
        self.bias = nn.Parameter(torch.randn(d_model))
        self.out_proj = nn.Linear(d_model, d_model)

    @property
    def state_size(self) -> None:
        return None

    def filter_response(self, length: int, device: torch.device) -> torch.Tensor:
        """``h: [D, L]``."""
        dtype = self.bias.dtype
        t = torch.linspace(0, 1, length, device=device, dtype=dtype)[:, None]
        bands = (self.emb_dim - 1) // 2
        freq = torch.linspace(1e-4, bands - 1, bands, device=device, dtype=dtype)
        angle = 2 * math.pi * freq * torch.arange(length, device=device, dtype=dtype)[:, None] / length
        z = torch.cat([t, torch.cos(angle), torch.sin(angle)], dim=-1)  # [L, emb_dim]
        h = self.filter(z).T  # [D, L]
        return h * torch.exp(-self.decay[:, None] * t.T)

    def featurize(self, x):
        x1, x2, v = self.short(self.in_proj(x)).chunk(3, dim=-1)
        return {"x1": x1.transpose(1, 2), "x2": x2.transpose(1, 2), "u": v.transpose(1, 2)[..., None]}

    def mix(self, f):
        gated = f["x1"] * f["u"][..., 0]  # [B, D, L]
        h = self.filter_response(gated.shape[-1], gated.device).to(gated.dtype)
        y = fft_causal_conv(gated, h) + self.bias[:, None] * gated
        return (f["x2"] * y)[..., None]

    def build_operator(self, f):
        length = f["u"].shape[-2]
        h = self.filter_response(length, f["u"].device).to(f["u"].dtype)  # [D, L]
        lag = torch.arange(length, device=h.device)
        diff = lag[:, None] - lag[None, :]
        toeplitz = torch.where(diff >= 0, h[:, diff.clamp_min(0)], 0)
        toeplitz = toeplitz + torch.diag_embed(self.bias[:, None].expand(-1, length).to(h.dtype))
        matrix = f["x2"][..., :, None] * toeplitz * f["x1"][..., None, :]
        return DenseOperator(matrix, validate=False)

    def readout(self, f, y):
        return self.out_proj(y[..., 0].transpose(1, 2))
