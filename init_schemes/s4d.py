"""S4D / HiPPO initializations of diagonal state matrices (in place, under ``no_grad``)."""

from __future__ import annotations

import math

import torch


def hippo_legs(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS ``(A, B)``: ``A_nk = -sqrt(2n+1) sqrt(2k+1)`` (n > k), ``-(n+1)`` (n = k), 0 above;
    ``B_n = sqrt(2n+1)``. Float64, ``[n, n]`` and ``[n]``."""
    q = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)
    A = -torch.tril(q[:, None] * q[None, :], -1) - torch.diag(torch.arange(1, n + 1, dtype=torch.float64))
    return A, q.clone()


def s4d_modes(scheme: str, state: int) -> torch.Tensor:
    """The ``state / 2`` complex eigenvalues ``A_n`` (``Re A < 0``) of an S4D scheme.

    ``"lin"``: ``-1/2 + i pi n``; ``"inv"``: ``-1/2 + i (N/pi)(N/(2n+1) - 1)``; ``"real"``:
    ``-(n+1)``; ``"legs"``: the eigenvalues of the normal part of HiPPO-LegS (real part ``-1/2``).
    """
    if state < 2 or state % 2:
        raise ValueError(f"state must be an even number >= 2, got {state}")
    modes = state // 2
    n = torch.arange(modes, dtype=torch.float64)
    half = torch.full((modes,), -0.5, dtype=torch.float64)
    if scheme == "lin":
        return torch.complex(half, math.pi * n)
    if scheme == "inv":
        return torch.complex(half, (state / math.pi) * (state / (2 * n + 1) - 1))
    if scheme == "real":
        return torch.complex(-(n + 1), torch.zeros_like(n))
    if scheme == "legs":
        A, _ = hippo_legs(state)
        p = torch.sqrt(torch.arange(state, dtype=torch.float64) + 0.5)
        skew = A + p[:, None] * p[None, :] + 0.5 * torch.eye(state, dtype=torch.float64)
        frequencies = torch.linalg.eigvalsh(-1j * skew.to(torch.complex128))  # skew -> Hermitian
        positive = frequencies[frequencies > 0].sort().values[:modes]
        if positive.numel() < modes:
            positive = torch.nn.functional.pad(positive, (modes - positive.numel(), 0))
        return torch.complex(half, positive)
    raise ValueError(f"S4D scheme must be one of lin, inv, real, legs, got {scheme!r}")


@torch.no_grad()
def s4d_A_(log_A_real: torch.Tensor, A_imag: torch.Tensor, scheme: str = "lin") -> None:
    """Set ``A = -exp(log_A_real) + i A_imag`` (both ``[H, N/2]``) to an S4D scheme for every channel."""
    modes = s4d_modes(scheme, 2 * log_A_real.shape[-1])
    log_A_real.copy_(torch.log(-modes.real).to(log_A_real.dtype).expand_as(log_A_real))
    A_imag.copy_(modes.imag.to(A_imag.dtype).expand_as(A_imag))


@torch.no_grad()
def log_uniform_(
    tensor: torch.Tensor, low: float, high: float, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Fill ``tensor`` with ``log x``, ``x`` log-uniform in ``[low, high]`` (S4D's ``log_dt``)."""
    if not 0 < low <= high:
        raise ValueError(f"need 0 < low <= high, got {low}, {high}")
    u = torch.rand(tensor.shape, generator=generator, dtype=torch.float64)
    tensor.copy_((u * (math.log(high) - math.log(low)) + math.log(low)).to(tensor.dtype))
    return tensor
