"""``"s4d"``: diagonal linear time-invariant SSM with complex modes and ZOH discretization."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.mixers._kernels import fft_causal_conv
from ess_reg.mixers.base import SequenceMixer
from ess_reg.operators import DiagonalRealization


class S4D(SequenceMixer):
    """S4D (Gu et al.): per channel ``h``, kernel ``K_k = 2 Re(sum_n C_n Bbar_n Abar_n^k)``.

    ``Abar = exp(dt A)``, ``Bbar = (exp(dt A) - 1) / A`` (ZOH with ``B = 1``), ``A_n = -1/2 + i pi n``
    (S4D-Lin), ``log dt ~ U(log dt_min, log dt_max)`` per channel, ``C`` complex normal. The forward
    is an FFT convolution with the kernel; output ``GELU(y + D u)``, then a GLU projection. The
    operator is the complex realization ``c = 2 C``, ``b = Bbar``, ``log_decay = dt A`` (real part
    convention); TSS per channel: ``d_state`` (``d_state / 2`` complex modes).
    """

    name = "s4d"

    def __init__(self, d_model: int, d_state: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1) -> None:
        super().__init__()
        if d_state % 2:
            raise ValueError(f"d_state must be even (d_state / 2 complex modes), got {d_state}")
        self.d_model, self.d_state = d_model, d_state
        modes = d_state // 2
        self.log_dt = nn.Parameter(torch.rand(d_model) * (math.log(dt_max) - math.log(dt_min))
                                   + math.log(dt_min))
        self.log_A_real = nn.Parameter(torch.full((d_model, modes), math.log(0.5)))
        self.A_imag = nn.Parameter(math.pi * torch.arange(modes, dtype=torch.float32).repeat(d_model, 1))
        self.C = nn.Parameter(torch.view_as_real(torch.randn(d_model, modes, dtype=torch.cfloat)))
        self.D = nn.Parameter(torch.randn(d_model))
        self.output = nn.Linear(d_model, 2 * d_model)

    @property
    def state_size(self) -> int:
        return self.d_state

    def discretize(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dt A, Bbar, 2 C)``, each complex ``[H, N/2]``."""
        A = torch.complex(-torch.exp(self.log_A_real), self.A_imag)
        dtA = A * torch.exp(self.log_dt)[:, None]
        return dtA, (torch.exp(dtA) - 1) / A, 2 * torch.view_as_complex(self.C)

    def kernel(self, length: int) -> torch.Tensor:
        """``K: [H, L]`` via a Vandermonde product (``|Abar^k| <= 1``, no overflow)."""
        dtA, Bbar, C2 = (t.to(torch.complex128) for t in self.discretize())
        steps = torch.arange(length, device=dtA.device, dtype=torch.float64)
        powers = torch.exp(dtA[:, :, None] * steps)  # [H, N/2, L], computed in float64
        return torch.einsum("hn,hnl->hl", C2 * Bbar, powers).real.to(self.log_dt.dtype)

    def featurize(self, x):
        return {"u": x.transpose(1, 2)[..., None]}  # [B, H, L, 1]

    def mix(self, f):
        u = f["u"][..., 0]
        return fft_causal_conv(u, self.kernel(u.shape[-1]))[..., None]

    def build_operator(self, f):
        batch, channels, length, _ = f["u"].shape
        dtA, Bbar, C2 = self.discretize()
        shape = (batch, channels, length, self.d_state // 2)
        dtype = torch.complex128 if f["u"].dtype == torch.float64 else torch.complex64
        return DiagonalRealization(C2[None, :, None].expand(shape).to(dtype),
                                   Bbar[None, :, None].expand(shape).to(dtype),
                                   dtA[None, :, None].expand(shape).to(dtype), validate=False)

    def readout(self, f, y):
        y = F.gelu(y + self.D[:, None, None] * f["u"])[..., 0].transpose(1, 2)
        return F.glu(self.output(y), dim=-1)
