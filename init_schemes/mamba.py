"""Mamba-1 / Mamba-2 initializations of ``A`` and ``dt`` (in place, under ``no_grad``)."""

from __future__ import annotations

import math

import torch


@torch.no_grad()
def mamba_A_log_(A_log: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """S4D-Real: ``A_log[d, n] = log(scale * (n + 1))``, i.e. ``A = -scale * (1 .. N)`` per channel."""
    n = A_log.shape[-1]
    values = torch.log(scale * torch.arange(1, n + 1, dtype=torch.float64))
    return A_log.copy_(values.to(A_log.dtype).expand_as(A_log))


@torch.no_grad()
def mamba2_A_log_(
    A_log: torch.Tensor, low: float = 1.0, high: float = 16.0, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Mamba-2: ``A_h ~ U(low, high)`` per head, stored as ``log A_h``."""
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    u = torch.rand(A_log.shape, generator=generator, dtype=torch.float64)
    return A_log.copy_(torch.log(low + u * (high - low)).to(A_log.dtype))


@torch.no_grad()
def dt_bias_(
    bias: torch.Tensor,
    dt_min: float = 1e-3,
    dt_max: float = 1e-1,
    floor: float = 1e-4,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``bias = softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]`` clamped at ``floor``
    (Mamba-1 ``dt_proj.bias``, Mamba-2 ``dt_bias``)."""
    if not 0 < dt_min <= dt_max:
        raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
    u = torch.rand(bias.shape, generator=generator, dtype=torch.float64)
    dt = torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp_min(floor)
    return bias.copy_((dt + torch.log(-torch.expm1(-dt))).to(bias.dtype))
