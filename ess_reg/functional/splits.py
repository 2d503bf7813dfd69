"""Which split indices ``i`` (1 <= i <= L-1) to evaluate."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

Splits = int | Sequence[int] | torch.Tensor | None


def resolve_splits(splits: Splits, seq_len: int, device: torch.device | None = None) -> torch.Tensor:
    """Turn the ``splits`` argument into a 1-D ``int64`` tensor of split indices.

    ``None``: all splits ``1 .. L-1``. An int ``k``: ``k`` evenly spaced splits, each at the centre
    of one of ``k`` equal cells of ``1 .. L-1`` (``k >= L-1`` gives all of them; ``k = 1`` gives the
    middle). A sequence or 1-D integer tensor: exactly those splits, in that order.
    """
    if seq_len < 2:
        raise ValueError(f"a sequence of length {seq_len} has no split: ESS looks at the block of outputs "
                         "from position i on against inputs before i, so it needs L >= 2")
    last = seq_len - 1
    if splits is None:
        return torch.arange(1, seq_len, device=device)
    if isinstance(splits, bool):
        raise TypeError("splits must be None, an int or a 1-D sequence of ints, got a bool")
    if isinstance(splits, numbers.Integral) and not isinstance(splits, torch.Tensor):
        splits = int(splits)  # numpy integers count splits like Python ints
        if splits < 1:
            raise ValueError(f"splits must be a positive number of splits, got {splits}")
        count = min(splits, last)
        cells = (torch.arange(count, dtype=torch.float64) + 0.5) * (last / count)
        return (1 + cells.floor().long()).clamp(1, last).to(device)
    if not isinstance(splits, torch.Tensor | Sequence) and hasattr(splits, "__array__"):
        splits = torch.as_tensor(splits)  # numpy arrays
    if isinstance(splits, torch.Tensor):
        if splits.is_floating_point() or splits.is_complex() or splits.dtype == torch.bool:
            raise TypeError(f"splits must hold integer split indices, got dtype {splits.dtype}")
        index = splits.to(device=device, dtype=torch.long)
    elif isinstance(splits, Sequence) and not isinstance(splits, str):
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in splits):
            raise TypeError("splits must be a sequence of ints (split indices)")
        index = torch.tensor(list(splits), dtype=torch.long, device=device)
    else:
        raise TypeError(
            f"splits must be None, an int or a 1-D sequence of ints, got {type(splits).__name__}"
        )
    if index.dim() != 1 or index.numel() == 0:
        hint = " (pass a Python int for a number of splits)" if index.dim() == 0 else ""
        raise ValueError(
            f"splits must be a non-empty 1-D index tensor, got shape {tuple(index.shape)}{hint}"
        )
    low, high = int(index.min()), int(index.max())
    if low < 1 or high > last:
        raise ValueError(
            f"split indices must lie in 1 .. L-1 = 1 .. {last} (split i uses T[i:, :i]), got "
            f"values from {low} to {high}"
        )
    return index


def max_block_rank(splits: torch.Tensor, seq_len: int) -> int:
    """``max_i min(i, L - i)`` over the given splits: the largest possible rank of any block."""
    return int(torch.minimum(splits, seq_len - splits).max())
