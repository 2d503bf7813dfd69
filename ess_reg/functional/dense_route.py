"""Dense route: singular values of every split block ``T[i:, :i]`` from the materialized ``T``.

Splits are batched, not looped: sorted splits are grouped into buckets of neighbouring indices,
each bucket's blocks are zero-padded to one common shape (the padding adds only exact zeros to the
spectrum) and go through one batched ``svdvals`` call. Buckets are sized so that padding costs at
most ``_PADDING_OVERHEAD`` extra work and each call stays under a memory budget. Cost per channel
for all splits is ``O(L^4)``; memory ``O(budget)``.
"""

from __future__ import annotations

import torch

#: A bucket may do at most this factor of the work its blocks need unpadded.
_PADDING_OVERHEAD = 1.35
#: Elements of one padded batch handed to ``svdvals`` (about 256 MB in float64).
_MEMORY_BUDGET = 1 << 25


def dense_singular_values(matrix: torch.Tensor, splits: torch.Tensor, rank: int) -> torch.Tensor:
    """Singular values of ``matrix[:, i:, :i]`` for each split ``i``, descending, zero-padded.

    Args:
        matrix: ``[M, L, L]`` lower-triangular, in the compute dtype (``M`` = batch x channels).
        splits: ``[S]`` int64 split indices on the CPU, each in ``1 .. L-1`` (any order, repeats ok).
        rank: number of values kept per split (``R``).

    Returns:
        ``[M, S, R]``; entries past ``min(i, L - i)`` are exactly zero.
    """
    length = matrix.shape[-1]
    unique, inverse = torch.unique(splits, sorted=True, return_inverse=True)
    pieces = [
        _bucket_singular_values(matrix, unique[start:stop], rank)
        for start, stop in _buckets(unique.tolist(), length, matrix.shape[0])
    ]
    values = torch.cat(pieces, dim=1)  # [M, U, R] in sorted unique order
    values = values[:, inverse.to(values.device)]
    limit = torch.minimum(splits, length - splits).to(values.device)
    keep = torch.arange(rank, device=values.device) < limit[:, None]
    return values * keep


def _block_cost(rows: int, cols: int) -> int:
    return rows * cols * min(rows, cols)


def _buckets(splits: list[int], length: int, batch: int) -> list[tuple[int, int]]:
    """Greedy grouping of sorted splits into ``(start, stop)`` ranges of neighbouring indices."""
    ranges: list[tuple[int, int]] = []
    start = 0
    while start < len(splits):
        need = _block_cost(length - splits[start], splits[start])
        stop = start + 1
        while stop < len(splits):
            rows, cols = length - splits[start], splits[stop]
            padded = (stop - start + 1) * _block_cost(rows, cols)
            extra_need = need + _block_cost(length - splits[stop], splits[stop])
            fits = (stop - start + 1) * rows * cols * batch <= _MEMORY_BUDGET
            if padded > _PADDING_OVERHEAD * extra_need or not fits:
                break
            need = extra_need
            stop += 1
        ranges.append((start, stop))
        start = stop
    return ranges


def _bucket_singular_values(matrix: torch.Tensor, splits: torch.Tensor, rank: int) -> torch.Tensor:
    """``[M, g, R]`` singular values for one bucket of sorted splits."""
    length = matrix.shape[-1]
    low, high = int(splits[0]), int(splits[-1])
    block = matrix[:, low:, :high]  # [M, L - low, high]
    device = matrix.device
    split = splits.to(device)[:, None, None]
    rows = torch.arange(low, length, device=device)[None, :, None]
    cols = torch.arange(high, device=device)[None, None, :]
    mask = (rows >= split) & (cols < split)  # [g, L - low, high]
    chunk = max(1, _MEMORY_BUDGET // max(1, mask.numel()))
    out = []
    for start in range(0, matrix.shape[0], chunk):
        padded = block[start:start + chunk, None] * mask
        out.append(torch.linalg.svdvals(padded))
    values = torch.cat(out, dim=0)
    width = values.shape[-1]
    if width >= rank:
        return values[..., :rank]
    return torch.nn.functional.pad(values, (0, rank - width))
