"""Efficient kernels shared by the mixers (private): chunked diagonal scan, convolutions, norms."""

from __future__ import annotations

import math

import torch
from torch import nn

#: Element budget of one chunk's decay tensor ``[B, C, K, K, N]`` in the chunked scan.
_CHUNK_BUDGET = 1 << 22
#: Below this chunk length the step-by-step recurrence is used instead.
_MIN_CHUNK = 8


def diagonal_scan(
    c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor | None, u: torch.Tensor,
    *, method: str = "auto",
) -> torch.Tensor:
    """``y_i = Re(c_i^T h_i)``, ``h_i = diag(exp(log_decay_i)) h_{i-1} + b_i u_i^T`` (state ``N x P``).

    Two exact evaluations. ``"chunked"``: quadratic form inside chunks of ``K`` steps, state carried
    across chunks, all decays as ``exp`` of non-positive cumulative sums (never overflowing).
    ``"recurrent"``: one step at a time. ``"auto"`` takes the recurrence for per-state (diagonal)
    decays on CPU, where the chunked form's ``[B, C, K, K, N]`` decay tensor costs several times
    more than the ``L`` steps (measured 2.5x to 13x for S6 and GLA shapes at ``L = 64``), and when
    chunks would be very short; the chunked form otherwise (scalar or no decay, accelerators).
    Shapes: ``c``, ``b`` ``[B, C, L, N]``; ``log_decay`` ``[B, C, L, N]``, ``[B, C, L, 1]`` or None;
    ``u`` ``[B, C, L, P]``. Returns ``[B, C, L, P]`` (real).
    """
    if method not in ("auto", "chunked", "recurrent"):
        raise ValueError(f"method must be 'auto', 'chunked' or 'recurrent', got {method!r}")
    batch, channels, _, n = c.shape
    work = c.dtype
    u = u.to(work)
    state = u.new_zeros(batch, channels, n, u.shape[-1])
    diagonal = log_decay is not None and log_decay.shape[-1] > 1
    per_step = batch * channels * (n if diagonal else 1)
    chunk = max(1, min(64, int((_CHUNK_BUDGET / max(1, per_step)) ** 0.5)))
    if method == "auto":
        short = chunk < _MIN_CHUNK
        method = "recurrent" if diagonal and (c.device.type == "cpu" or short) else "chunked"
    if method == "recurrent":
        if log_decay is None:
            log_decay = torch.zeros_like(c[..., :1].real)
        return _recurrent_scan(c, b, log_decay, u)
    outputs = []
    # split once: slicing chunk by chunk would make the backward fill full-size zeros per chunk
    pieces = [t.split(chunk, dim=2) for t in (c, b, u)]
    decays = log_decay.split(chunk, dim=2) if log_decay is not None else [None] * len(pieces[0])
    for cc, bb, uu, ld in zip(*pieces, decays, strict=True):
        size = cc.shape[2]
        causal = torch.ones(size, size, dtype=torch.bool, device=c.device).tril()
        if ld is None:
            scores = (cc @ bb.mT).masked_fill(~causal, 0)
            y = scores @ uu + cc @ state
            state = state + bb.mT @ uu
        else:
            lam = torch.cumsum(ld, dim=-2)  # [B, C, K, N or 1]
            if diagonal:
                decay = _masked_exp(lam[:, :, :, None, :] - lam[:, :, None, :, :], causal[..., None])
                scores = torch.einsum("bcin,bcjn,bcijn->bcij", cc, bb, decay)
            else:
                decay = _masked_exp(lam[:, :, :, None, 0] - lam[:, :, None, :, 0], causal)
                scores = (cc @ bb.mT) * decay
            y = scores @ uu + (cc * torch.exp(lam)) @ state
            last = lam[:, :, -1:]
            state = torch.exp(last).mT * state + (bb * torch.exp(last - lam)).mT @ uu
        outputs.append(y)
    y = torch.cat(outputs, dim=-2)
    return y.real if y.is_complex() else y


def _recurrent_scan(
    c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """The same recurrence one step at a time (state ``[B, C, N, P]``)."""
    state = u.new_zeros(*c.shape[:2], c.shape[-1], u.shape[-1])
    outputs = []
    # unbind once: indexing step by step would make the backward fill a full-size zero tensor per step
    steps = zip(torch.exp(log_decay).unbind(2), b.unbind(2), u.unbind(2), c.unbind(2), strict=True)
    for decay, b_t, u_t, c_t in steps:
        state = decay[..., None] * state + b_t[..., None] * u_t[..., None, :]
        outputs.append((c_t[..., None] * state).sum(-2))
    y = torch.stack(outputs, dim=2)
    return y.real if y.is_complex() else y


def _masked_exp(exponent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    zero = torch.zeros((), dtype=exponent.dtype, device=exponent.device)
    return torch.where(keep, torch.exp(torch.where(keep, exponent, zero)), zero)


def fft_causal_conv(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Causal (linear, not circular) convolution along the last dim: ``y_i = sum_k kernel_k u_{i-k}``.

    ``u``: ``[..., L]``, ``kernel``: broadcastable ``[..., L]``; FFT of size ``2L`` in float64 (the
    FFT's rounding grows with ``L``), result in ``u``'s dtype.
    """
    length = u.shape[-1]
    size = 2 * length
    spectrum = torch.fft.rfft(u.double(), n=size) * torch.fft.rfft(kernel.double(), n=size)
    return torch.fft.irfft(spectrum, n=size)[..., :length].to(u.dtype)


class ShortConv(nn.Module):
    """Causal depthwise convolution over time, ``[B, L, D] -> [B, L, D]`` (kernel ``k``)."""

    def __init__(self, channels: int, kernel_size: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels,
                              padding=kernel_size - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.transpose(1, 2))[..., : x.shape[1]].transpose(1, 2)


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned scale (per-head output norms, block norms)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # at least float32 inside: in float16 the rsqrt's backward overflows on small inputs
        w = x if x.dtype in (torch.float32, torch.float64) else x.float()
        return (w * torch.rsqrt(w.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H * d] -> [B, H, L, d]``."""
    batch, length, width = x.shape
    return x.view(batch, length, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, d] -> [B, L, H * d]``."""
    batch, heads, length, width = x.shape
    return x.transpose(1, 2).reshape(batch, length, heads * width)


def inverse_softplus(x: torch.Tensor) -> torch.Tensor:
    """``log(exp(x) - 1)``, stable: ``x + log(-expm1(-x))``."""
    return x + torch.log(-torch.expm1(-x))


def dt_bias_init(size: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Mamba's ``dt`` bias: ``softplus^-1(dt)``, ``dt`` log-uniform in ``[dt_min, dt_max]``, floored."""
    span = math.log(dt_max) - math.log(dt_min)
    dt = torch.exp(torch.rand(size) * span + math.log(dt_min)).clamp_min(floor)
    return inverse_softplus(dt)
