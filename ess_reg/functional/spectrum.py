"""ESS from singular values: entropy (effective rank) and tolerance counts."""

from __future__ import annotations

import torch


def entropy_ess(singular_values: torch.Tensor) -> torch.Tensor:
    """Entropy-ESS ``exp(-sum p log p)`` with ``p = sigma / sum(sigma)`` over the last dim.

    ``[..., R] -> [...]``. An all-zero spectrum gives 0, one holding NaN gives NaN. Terms with ``p`` below
    ``eps(dtype) * 1e-3`` are dropped from both value and gradient (their total contribution is
    below ``1e-15`` relative in float64), so gradients stay finite for rank-deficient blocks and
    repeated or zero singular values.
    """
    total = singular_values.sum(dim=-1, keepdim=True)
    tiny = torch.finfo(singular_values.dtype).tiny
    p = singular_values / total.clamp_min(tiny)
    floor = torch.finfo(singular_values.dtype).eps * 1e-3
    present = p > floor
    safe = torch.where(present, p, torch.ones((), dtype=p.dtype, device=p.device))
    entropy = -(torch.where(present, p * torch.log(safe), 0)).sum(dim=-1)
    nonzero = total.squeeze(-1) > 0
    return _keep_nan(torch.where(nonzero, torch.exp(entropy), 0), singular_values)


def tolerance_ess(
    singular_values: torch.Tensor, tol: float = 1e-3, *, relative: bool = True
) -> torch.Tensor:
    """Tolerance-ESS: number of singular values ``> tol`` (``> tol * sigma_max`` if ``relative``).

    ``[..., R] -> [...]``, as floating point counts in the input dtype; piecewise constant, so it
    carries no gradient. An all-zero spectrum gives 0, one holding NaN gives NaN.
    """
    sigma = singular_values.detach()
    threshold = tol * sigma.amax(dim=-1, keepdim=True) if relative else tol
    return _keep_nan((sigma > threshold).sum(dim=-1).to(sigma.dtype), sigma)


def _keep_nan(ess: torch.Tensor, singular_values: torch.Tensor) -> torch.Tensor:
    """NaN where a spectrum holds NaN (a non-finite operator checked on the device)."""
    return torch.where(torch.isnan(singular_values.detach()).any(dim=-1), torch.nan, ess)
