"""Exact power-of-two scaling and the resolution rules shared by both routes (private).

ESS only depends on singular values relative to each other, so both routes work in a scaled
form: factors and operators are scaled per channel by exact powers of two before any arithmetic
in the compute dtype, and each split's values are returned relative to a per-split scale carried
as a logarithm (``sigma = values * exp(log_scale)``). Two rules decide what counts as zero:

* **relative resolution**: singular values at or below ``8 * n * eps * sigma_max`` of their own
  split block are exactly zero (``n`` the block's largest possible rank);
* **absolute floor**: a split block whose largest singular value lies below ``1024 * tiny`` of
  the compute dtype, measured after its channel was scaled to a largest factor of about 1, is
  zero as a whole (in float64 a block ``1e-305`` times its channel's scale, in float32
  ``1e-35`` times).

Zeroed values carry no gradient. A third rule concerns gradients only:

* **gradient resolution**: values at or below ``GRADIENT_RESOLUTION * sigma_max`` of their block
  (``1e-4`` in float64 compute, ``1e-3`` in float32) keep their value but carry no gradient
  (:func:`limit_gradient`). The Gramian route's derivatives of such values come from Gramians, where
  rounding enters as ``eps * (sigma_max / sigma)^2``; above the cutoff that is at most about
  a few ``1e-7`` of the whole gradient (measured), below it the values' share of the entropy-ESS
  gradient is at most about ``1e-3`` (``p log(1/p)``), far less in the usual decaying spectra. Both routes
  follow the rule, so their gradients agree.
"""

from __future__ import annotations

import math

import torch

#: Singular values at or below ``RESOLUTION_FACTOR * n * eps * sigma_max`` are exactly zero.
RESOLUTION_FACTOR = 8.0
#: Blocks whose largest singular value is below ``FLOOR_FACTOR * tiny`` (channel-relative) are zero.
FLOOR_FACTOR = 1024.0
LN2 = math.log(2.0)
#: Values at or below this fraction of their block's largest carry no gradient (see module doc).
GRADIENT_RESOLUTION = {torch.float64: 1e-4, torch.float32: 1e-3}
#: Per-step log-decays below this are raised to it: a reset that strong already zeroes every
#: exponent it enters (``exp(-1500) = 0``), and the floor keeps the float64 cumsum finite and exact.
LOG_DECAY_FLOOR = -1500.0


def real_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.empty((), dtype=dtype).real.dtype


def power_of_two_exponent(peak: torch.Tensor) -> torch.Tensor:
    """``floor(log2(peak))`` as a float tensor, 0 where ``peak`` is zero or subnormal."""
    tiny = torch.finfo(peak.dtype).tiny
    normal = peak >= tiny
    safe = torch.where(normal, peak, torch.ones((), dtype=peak.dtype, device=peak.device))
    return torch.where(normal, torch.floor(torch.log2(safe)), torch.zeros_like(safe))


def normalize_channels(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x * 2^-e, e)`` with ``e`` per slice over ``dims`` chosen so that ``max |x * 2^-e|`` lies
    in ``[1, 2)``; slices whose largest entry is zero or subnormal become exactly zero.

    The scaling is exact and ``e`` is detached; ``e`` has ``x``'s shape without ``dims``.
    """
    magnitude = x.detach().abs()
    if magnitude.dtype in (torch.float16, torch.bfloat16):
        magnitude = magnitude.float()
    peak = magnitude.amax(dim=dims, keepdim=True)
    exponent = power_of_two_exponent(peak)
    live = peak >= torch.finfo(peak.dtype).tiny
    if x.dtype in (torch.float16, torch.bfloat16):  # 2^-e may not fit a half-precision float
        x = x.float()
    factor = torch.where(live, torch.exp2(-exponent), torch.zeros_like(exponent)).to(x.real.dtype)
    return x * factor, exponent.squeeze(dims) if dims else exponent


def times_power_of_two(x: torch.Tensor, exponent: torch.Tensor) -> torch.Tensor:
    """``x * 2^exponent`` (``exponent`` detached, broadcast against ``x``), exact, in two halves of
    the exponent: neither the product nor its derivative leaves the range on the way when the ends
    fit, where one factor ``2^exponent`` could itself overflow (``|exponent| > 1023``), and where
    two separate scalings (normalize, then shift) would carry the derivative through an
    intermediate past the float64 range."""
    exponent = exponent.detach()
    first = torch.floor(exponent / 2)
    dtype = x.real.dtype
    return (x * torch.exp2(first).to(dtype)) * torch.exp2(exponent - first).to(dtype)


def flush_subnormal(x: torch.Tensor) -> torch.Tensor:
    """``x`` with entries (real and imaginary parts separately) below the smallest normal number of
    its dtype set to exactly zero: subnormals make some LAPACK builds return non-finite
    factorizations, and they lie far below any split's resolution."""
    return flush_below(x, torch.finfo(x.dtype).tiny)


def flush_subnormal_cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``flush_subnormal(x.to(dtype))``, skipping the flush where it cannot change anything: every
    non-zero value of ``x``'s dtype (its subnormals included) is a normal number of a wider
    ``dtype`` (a float32 or half-precision tensor cast to float64)."""
    source, target = torch.finfo(x.real.dtype), torch.finfo(real_dtype(dtype))
    cast = x.to(dtype)
    if source.tiny * source.eps >= target.tiny:
        return cast
    return flush_subnormal(cast)


def flush_below(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """``x`` with real and imaginary parts of magnitude below ``threshold`` set to exactly zero.

    The derivative passes unchanged (an entry that is zero, or flushed to zero, still moves the
    result when it grows)."""
    if x.is_complex():
        return torch.complex(flush_below(x.real, threshold), flush_below(x.imag, threshold))
    small = x.abs() < threshold
    if x.requires_grad:  # x - x is exactly zero where selected, with derivative 1
        return torch.where(small, x - x.detach(), x)
    return torch.where(small, torch.zeros((), dtype=x.dtype, device=x.device), x)


def clean_values(
    values: torch.Tensor, exponent: torch.Tensor, rank_bound: torch.Tensor | int
) -> torch.Tensor:
    """Apply the two zero rules to descending ``values`` ``[..., S, R]`` of blocks scaled by
    ``2^exponent`` (``[..., S]``, channel-relative); ``rank_bound`` is ``n`` of the resolution."""
    finfo = torch.finfo(values.dtype)
    top = values[..., :1]
    if isinstance(rank_bound, torch.Tensor):
        rank_bound = rank_bound.to(values.device, values.dtype)[..., None]
    resolved = values > RESOLUTION_FACTOR * rank_bound * finfo.eps * top
    # log2 of the block's largest value against log2 of the floor, so nothing under- or overflows
    top_log2 = torch.log2(top.clamp_min(finfo.tiny)) + exponent[..., None].to(values.dtype)
    above_floor = top_log2 >= math.log2(FLOOR_FACTOR * finfo.tiny)
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    return torch.where(resolved & above_floor, values, zero)


def floor_log_decay(log_decay: torch.Tensor | None) -> torch.Tensor | None:
    """``log_decay`` with its real part raised to at least ``LOG_DECAY_FLOOR`` and its imaginary
    part (a rotation) reduced to ``[0, 2 pi)``, so that the cumsum stays finite and exact."""
    if log_decay is None:
        return None
    if log_decay.is_complex():
        return torch.complex(log_decay.real.clamp_min(LOG_DECAY_FLOOR),
                             torch.remainder(log_decay.imag, 2 * math.pi))
    return log_decay.clamp_min(LOG_DECAY_FLOOR)


def limit_gradient(values: torch.Tensor) -> torch.Tensor:
    """``values`` ``[..., R]`` (descending) with the gradient of entries at or below
    ``GRADIENT_RESOLUTION * values[..., :1]`` stopped (their values unchanged)."""
    cutoff = GRADIENT_RESOLUTION.get(values.dtype, 1e-3) * values[..., :1].detach()
    return torch.where(values.detach() > cutoff, values, values.detach())
