"""Argument checks shared by the operator classes (private)."""

from __future__ import annotations

import torch


def require_tensor(value: object, name: str) -> torch.Tensor:
    """Return ``value`` if it is a floating or complex tensor, else raise ``TypeError``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not (value.is_floating_point() or value.is_complex()):
        raise TypeError(
            f"{name} must be a floating-point or complex tensor, got dtype {value.dtype}; "
            f"convert it with {name}.float()"
        )
    return value


def require_rank(value: torch.Tensor, name: str, layout: str) -> None:
    """Leading dims are ``[batch, channel]`` with the batch optional: 3 or 4 dims in all."""
    if value.dim() in (3, 4):
        return
    if value.dim() == 2:
        fix = f"add a channel dim for a single channel, e.g. {name}[None]"
    elif value.dim() < 2:
        fix = "pass a sequence of length L >= 2 per channel"
    else:
        fix = f"merge the extra leading dims into the batch, e.g. {name}.flatten(0, {value.dim() - 4})"
    raise ValueError(
        f"{name} must have shape {layout} (3 dims without a batch, 4 with one), got "
        f"{tuple(value.shape)} ({value.dim()} dims); {fix}"
    )


def require_seq_len(seq_len: int, name: str) -> None:
    if seq_len < 2:
        raise ValueError(
            f"{name} has sequence length {seq_len}; ESS needs at least 2 positions "
            "(a split i has inputs before i and outputs from i on)"
        )


def require_finite(value: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` if ``value`` holds NaN or Inf (one host sync per tensor)."""
    bad = ~torch.isfinite(value.detach())
    if bool(bad.any()):
        count = int(bad.sum())
        first = tuple(int(k) for k in bad.nonzero()[0])
        raise ValueError(
            f"{name} contains {count} non-finite value(s) (NaN or Inf), first at index {first}; "
            "check the layer's inputs and parameters, or clamp the offending values"
        )


def real_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The real dtype matching ``dtype`` (``complex128 -> float64``)."""
    return torch.empty((), dtype=dtype).real.dtype
