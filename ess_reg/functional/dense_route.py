"""Dense route: singular values of every split block ``H_i = T[i:, :i]`` from the materialized ``T``.

Four things make it faster than one ``svdvals`` call per split, without giving up exactness:

* **Short side first.** A split past the middle is mirrored: with ``T'[p, q] = T[L-1-q, L-1-p]``
  (also lower-triangular), ``H_i`` of ``T`` is ``H_{L-i}`` of ``T'`` reversed and transposed, with
  the same singular values. So every block handled has at most as many columns as rows.
* **One QR per group of splits.** Sorted splits ``i <= b`` of one group all contain the rows
  ``T[b:, :i]``, the first ``i`` columns of ``T[b:, :b] = Q R``. Column prefixes keep their
  triangular factor (``T[b:, :i] = Q R[:, :i]``, and ``R[:, :i]`` has only ``i`` non-zero rows), so
  ``H_i`` has the singular values of the ``b x i`` stack ``[T[i:b, :i]; R[:i, :i]]`` instead of the
  ``(L-i) x i`` block. The stacks of a group are zero-padded to ``b x b`` (exact zeros only) and go
  through one batched call.
* **Gram eigenvalues where certified.** ``eigvalsh`` of ``H_i^H H_i`` costs about half an SVD and
  is accurate to ``eps * cond^2`` relative; it is kept for splits whose condition number is at most
  1000 (about ``2e-10`` relative), every other split gets the SVD of its stack. CPU only: picking
  the splits reads a mask on the host, which an accelerator would have to wait for.
* **All cores.** Groups are independent and run on a thread pool, one single-threaded LAPACK call
  per worker (see ``ess_reg._parallel``).

When gradients are needed the values come from the same route (its QR step is never
differentiated: that derivative divides by ``R``'s diagonal, zero for rank-deficient blocks);
only ``T`` is kept for the backward, which recomputes each group's padded blocks ``T[i:, :i]``
and adds ``U diag(grad) V^H``, one group at a time, so memory stays ``O(budget)`` at any length
and number of splits. On the CPU, a block whose values that carry a gradient are all at least about
1e-4 times its largest, and at least that far from the values that carry none, gets that term from
a float64 ``eigh`` of its shorter side's Gram matrix, ``B V diag(grad / s) V^H``, about half the
work of an SVD with both sets of vectors, which the other blocks get. ESS gradients stop below
``1e-4`` of each block's largest value (the gradient resolution), so nearly every block of an ESS
gradient qualifies, whatever its condition number: only values straddling that cutoff closely send
a block to the SVD. Values below resolution are zero and take no part in the gradient, as in the
Gramian route. Cost per channel for all splits is ``O(L^4)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ess_reg._parallel import parallel_map
from ess_reg.functional._scaling import LN2, clean_values, normalize_channels, power_of_two_exponent

#: A group may do at most this factor of the work its splits need unpadded.
_PADDING_OVERHEAD = 1.35
#: At most this many splits share one QR (more gives the thread pool too few tasks).
_MAX_GROUP = 8
#: Elements of one padded batch handed to LAPACK (about 256 MB in float64) unless the memory
#: budget asks for less.
MEMORY_BUDGET = 1 << 25
#: Compute dtypes precise enough for singular values from Gram eigenvalues (see ``_gram_values``).
_GRAM_DTYPES = (torch.float64, torch.complex128)
#: Smallest eigenvalue / largest eigenvalue of a Gram matrix whose square roots are trusted.
_GRAM_MIN_RATIO = 1e-6
#: Smallest squared singular value carrying a gradient, over the largest squared, for which the
#: backward takes the Gram route: just below the float64 gradient resolution squared (1e-8).
_GRAM_GRADIENT_RATIO = 0.99e-8


@dataclass(frozen=True)
class _Task:
    """One batched ``svdvals`` call: a group of short-side splits over a slice of matrices."""

    mirrored: bool
    splits: tuple[int, ...]
    rows: slice


def dense_singular_values(
    matrix: torch.Tensor, splits: torch.Tensor, rank: int, element_budget: int = MEMORY_BUDGET
) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ``matrix[:, i:, :i]`` for each split ``i``, descending, in scaled form.

    Args:
        matrix: ``[M, L, L]`` lower-triangular, in the compute dtype (``M`` = batch x channels),
            each channel scaled to a largest entry of about 1.
        splits: ``[S]`` int64 split indices on the CPU, each in ``1 .. L-1`` (any order, repeats ok).
        rank: number of values kept per split (``R``).
        element_budget: most elements one batched LAPACK call may hold.

    Returns:
        ``values`` ``[M, S, R]`` and ``log_scale`` ``[M, S]``: the singular values are
        ``values * exp(log_scale)``; entries past ``min(i, L - i)`` and below resolution are
        exactly zero. With gradients each split's values are scaled to a largest value in
        ``[1, 2)`` (so the backward's weights stay in range) and the backward recomputes each
        group's singular vectors, holding one group at a time.
    """
    if torch.is_grad_enabled() and matrix.requires_grad:
        return _DenseSpectrum.apply(matrix, splits, rank, element_budget)
    values = _clean(_compressed_singular_values(matrix, splits, rank, element_budget), splits, matrix)
    return values, values.new_zeros(values.shape[:-1])


def _clean(values: torch.Tensor, splits: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """The resolution rules with ``n = min(i, L - i, R)`` per split, as in the Gramian route."""
    length, rank = matrix.shape[-1], values.shape[-1]
    bound = torch.minimum(torch.minimum(splits, length - splits), torch.tensor(rank))
    return clean_values(values, values.new_zeros(values.shape[:-1]), bound)


class _DenseSpectrum(torch.autograd.Function):
    """Per-split scaled singular values of the split blocks; the backward adds
    ``U diag(grad / scale) V^H`` of each block, recomputed group by group (only ``T`` is saved)."""

    @staticmethod
    def forward(ctx, matrix, splits, rank, element_budget):
        values = _clean(_compressed_singular_values(matrix, splits, rank, element_budget), splits, matrix)
        exponent = power_of_two_exponent(values[..., 0])  # [M, S]
        scaled = values * torch.exp2(-exponent)[..., None]
        log_scale = exponent * LN2
        ctx.save_for_backward(matrix, exponent, scaled)
        ctx.splits, ctx.element_budget = splits, element_budget
        ctx.mark_non_differentiable(log_scale)
        return scaled, log_scale

    @staticmethod
    def backward(ctx, grad_values, _grad_log_scale):
        matrix, exponent, scaled = ctx.saved_tensors
        weight = torch.where(scaled > 0, grad_values, 0) * torch.exp2(-exponent)[..., None]
        unique, inverse = torch.unique(ctx.splits, sorted=True, return_inverse=True)
        inverse = inverse.to(weight.device)
        weight = weight.new_zeros(weight.shape[0], unique.numel(), weight.shape[-1]).index_add_(
            1, inverse, weight)  # repeated splits add up
        # a repeated split has the same values at every occurrence
        values = scaled.new_zeros(weight.shape).index_copy_(1, inverse, scaled)
        certified = _gram_certified(values, weight != 0) if matrix.device.type == "cpu" else None
        grad = _blocks_gradient(matrix, unique.tolist(), weight, ctx.element_budget, certified)
        return grad, None, None, None


def _blocks_gradient(matrix: torch.Tensor, ordered: list[int], weight: torch.Tensor,
                     element_budget: int, certified: torch.Tensor | None = None) -> torch.Tensor:
    """``sum_i`` of ``U_i diag(weight_i) V_i^H`` placed at ``T[i:, :i]``: ``[M, L, L]``.

    ``certified`` ``[M, S]`` marks the blocks that :func:`_gram_certified` accepts: on the CPU their
    term comes from the Gram matrix's ``eigh`` (see :func:`_gram_gradient`), the others from an SVD
    with singular vectors."""
    length, count = matrix.shape[-1], matrix.shape[0]
    tasks: list[tuple[tuple[int, ...], range, slice]] = []
    start = 0
    for group in _groups(ordered, length, _block_cost):
        members = range(start, start + len(group))
        start += len(group)
        rows, cols = length - group[0], group[-1]
        chunk = max(1, element_budget // (len(group) * rows * cols))
        tasks += [(group, members, slice(s, s + chunk)) for s in range(0, count, chunk)]

    def solve(task: tuple[tuple[int, ...], range, slice]) -> torch.Tensor:
        group, members, channels = task
        blocks = _masked_blocks(matrix[channels], group)  # [m, g, L - low, b]
        w = _fit(weight[channels, members.start:members.stop], min(blocks.shape[-2:]))
        if certified is None or matrix.device.type != "cpu":  # accelerators: no host reads
            grad = _svd_gradient(blocks, w)
        else:  # each block by its own certificate
            easy = certified[channels, members.start:members.stop]  # [m, g]
            if bool(easy.all()):
                grad = _gram_gradient(blocks, w)
            elif not bool(easy.any()):
                grad = _svd_gradient(blocks, w)
            else:
                grad = torch.empty_like(blocks)
                grad[easy] = _gram_gradient(blocks[easy], w[easy])
                grad[~easy] = _svd_gradient(blocks[~easy], w[~easy])
        return (grad * _block_mask(group, length, matrix.device)).sum(dim=1)

    grad = torch.zeros_like(matrix)
    for (group, _, channels), piece in zip(tasks, parallel_map(solve, tasks, matrix.device), strict=True):
        grad[channels, group[0]:, :group[-1]] += piece
    return grad


def _gram_certified(values: torch.Tensor, carries: torch.Tensor) -> torch.Tensor:
    """``[M, S]``: whether the Gram route of the backward is exact to about ``eps * 1e8`` relative
    for a block with descending ``values`` ``[M, S, R]``, of which ``carries`` have a non-zero
    gradient weight (see :func:`_gram_gradient`).

    Two conditions, with ``r = _GRAM_GRADIENT_RATIO`` (about ``1e-8``): every value that carries
    a gradient has ``s^2 >= r s_max^2`` (its ``1 / s`` is then resolved), and wherever a value that
    carries a gradient sits next to one that does not, their squares are at least ``r s_max^2``
    apart (the Gram matrix mixes their vectors by about ``eps s_max^2 / (s_k^2 - s_j^2)``, and
    their weights differ by the whole weight). Values below the gradient resolution (``1e-4`` of
    their block's largest in float64 compute, see ``ess_reg.functional._scaling``) reach the
    backward with a zero weight, so a block of an ESS gradient fails only when values straddle
    that cutoff closely."""
    carries = carries & (values > 0)
    squares = values * values
    floor = _GRAM_GRADIENT_RATIO * squares[..., :1]
    resolved = (~carries | (squares >= floor)).all(dim=-1)
    switch = carries[..., 1:] != carries[..., :-1]
    separated = (~switch | (squares[..., :-1] - squares[..., 1:] >= floor)).all(dim=-1)
    return resolved & separated


def _svd_gradient(blocks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``U diag(weight) V^H`` of each block ``[..., rows, cols]`` (``weight`` ``[..., min(rows, cols)]``
    in descending order of the singular values), from an SVD with singular vectors."""
    left, _, right_h = torch.linalg.svd(blocks, full_matrices=False)
    return (left * weight.to(left.dtype)[..., None, :]) @ right_h


def _gram_gradient(blocks: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`_svd_gradient` through the Gram matrix of the blocks' shorter side, in float64.

    With ``B = U S V^H`` and ``B^H B = V S^2 V^H`` (``eigh``), ``U diag(w) V^H = B V diag(w / s) V^H``
    (or ``U diag(w / s) U^H B`` from ``B B^H`` for a wide block): one product, one ``eigh`` of the
    short side and one product instead of an SVD with both sets of vectors. The term is a spectral
    function of the Gram matrix, ``f(lambda) = w / sqrt(lambda)`` on the kept values, so rounding of
    about ``eps * s_max^2`` in the Gram matrix moves it by about ``eps * (s_max / s_min)^2`` relative
    (near-equal values carry near-equal weights, so mixing inside a cluster cancels): only blocks
    whose values with a non-zero weight are all at least about 1e-4 times their largest, and
    whose weighted and unweighted values are that far apart where they meet, take this route
    (``_gram_certified``): about ``2e-8`` relative for the smallest such value's term, far less for
    the larger ones.
    """
    wide = torch.complex128 if blocks.is_complex() else torch.float64
    # each block to a largest entry in [1, 2) (powers of two: exact), so its Gram matrix can neither
    # under- nor overflow; U diag(w) V^H = B V diag(w / s) V^H is invariant under scaling B
    b, _ = normalize_channels(blocks.to(wide), (-2, -1))
    tall = b.shape[-1] <= b.shape[-2]
    gram = b.mH @ b if tall else b @ b.mH
    eigenvalues, vectors = torch.linalg.eigh(gram)
    eigenvalues, vectors = eigenvalues.flip(-1), vectors.flip(-1)  # descending, as the weights
    sigma = eigenvalues.clamp_min(0).sqrt()
    w = weight.to(sigma.dtype)
    coefficient = torch.where(w != 0, w / sigma.clamp_min(torch.finfo(sigma.dtype).tiny), 0)
    spectral = (vectors * coefficient.to(wide)[..., None, :]) @ vectors.mH
    grad = b @ spectral if tall else spectral @ b
    return grad.to(blocks.dtype)


def _block_mask(group: tuple[int, ...], length: int, device: torch.device) -> torch.Tensor:
    """``[g, L - low, b]``: where each split's block ``T[i:, :i]`` lies in the padded stack."""
    low, widest = group[0], group[-1]
    split = torch.tensor(group, device=device)[:, None, None]
    rows = torch.arange(low, length, device=device)[None, :, None]
    cols = torch.arange(widest, device=device)[None, None, :]
    return (rows >= split) & (cols < split)


def _masked_blocks(part: torch.Tensor, group: tuple[int, ...]) -> torch.Tensor:
    """``[m, g, L - low, b]`` blocks ``T[i:, :i]`` of the group, zero-padded alike."""
    low, widest = group[0], group[-1]
    return part[:, None, low:, :widest] * _block_mask(group, part.shape[-1], part.device)


def _compressed_singular_values(matrix: torch.Tensor, splits: torch.Tensor, rank: int,
                                element_budget: int) -> torch.Tensor:
    """``[M, S, R]`` singular values (no autograd), grouped and QR-compressed (module docstring)."""
    length, count = matrix.shape[-1], matrix.shape[0]
    matrix = matrix.detach()
    unique, inverse = torch.unique(splits, sorted=True, return_inverse=True)
    ordered = unique.tolist()
    front = [i for i in ordered if 2 * i <= length]  # short side: columns
    back = [length - i for i in reversed(ordered) if 2 * i > length]  # mirrored, ascending

    tasks: list[_Task] = []
    owners: list[tuple[bool, range]] = []  # per group: mirrored?, its tasks (one per channel chunk)
    for mirrored, short in ((False, front), (True, back)):
        for group in _groups(short, length, _compressed_cost):
            rows, cols = group[-1], group[-1]
            chunk = max(1, element_budget // (len(group) * rows * cols))
            first = len(tasks)
            tasks += [_Task(mirrored, group, slice(s, s + chunk)) for s in range(0, count, chunk)]
            owners.append((mirrored, range(first, len(tasks))))

    sources = {False: matrix}
    if back:
        sources[True] = matrix.flip(-2, -1).transpose(-2, -1)
    results = parallel_map(lambda task: _fit(_compressed_values(sources[task.mirrored], task), rank),
                           tasks, matrix.device)

    pieces = {False: [], True: []}
    for mirrored, own in owners:
        pieces[mirrored].append(torch.cat([results[k] for k in own], dim=0))
    parts = []
    if pieces[False]:
        parts.append(torch.cat(pieces[False], dim=1))
    if pieces[True]:
        parts.append(torch.cat(pieces[True], dim=1).flip(1))  # mirrored splits back to ascending
    values = torch.cat(parts, dim=1)  # [M, U, R] in sorted unique order
    values = values[:, inverse.to(values.device)]
    limit = torch.minimum(splits, length - splits).to(values.device)
    keep = torch.arange(rank, device=values.device) < limit[:, None]
    return values * keep


# -- grouping ----------------------------------------------------------------------------------------
def _block_cost(split: int, widest: int, length: int) -> int:
    """Work of an SVD of ``T[split:, :widest]`` (rows x cols x the smaller of the two)."""
    rows = length - split
    return rows * widest * min(rows, widest)


def _compressed_cost(split: int, widest: int, length: int) -> int:
    """Work of an SVD of a ``widest x widest`` stack (the compressed block, padded)."""
    return widest**3


def _groups(short: list[int], length: int, cost: Callable[[int, int, int], int]) -> list[tuple[int, ...]]:
    """Greedy grouping of sorted short-side splits into runs whose padding stays cheap."""
    groups: list[tuple[int, ...]] = []
    start = 0
    while start < len(short):
        need = cost(short[start], short[start], length)
        stop = start + 1
        while stop < len(short) and stop - start < _MAX_GROUP:
            extra_need = need + cost(short[stop], short[stop], length)
            padded = (stop - start + 1) * cost(short[start], short[stop], length)
            if padded > _PADDING_OVERHEAD * extra_need:
                break
            need = extra_need
            stop += 1
        groups.append(tuple(short[start:stop]))
        start = stop
    return groups


# -- one task ----------------------------------------------------------------------------------------
def _compressed_values(source: torch.Tensor, task: _Task) -> torch.Tensor:
    """``[m, g, b]`` singular values of the group's splits: Gram eigenvalues where certified,
    otherwise an SVD of each ``[T[i:b, :i]; R[:i, :i]]`` stack."""
    splits, widest = task.splits, task.splits[-1]
    part = source[task.rows, splits[0]:, :widest]  # [m, L - i_0, b]: all the group's blocks use
    # power-of-two scaling per channel is exact and keeps Gram matrices away from under- and overflow
    peak = part.abs().amax(dim=(-2, -1)).clamp_min(torch.finfo(part.real.dtype).tiny)
    scale = torch.exp2(torch.floor(torch.log2(peak)))[:, None, None]  # peak / scale in [1, 2)
    bottom = widest - splits[0]
    triangular = torch.linalg.qr(part[:, bottom:] / scale, mode="r").R  # [m, b, b]
    tops = part[:, :bottom] / scale  # [m, b - i_0, b]: rows i_0 .. b-1
    if part.dtype not in _GRAM_DTYPES or part.device.type != "cpu":  # accelerators: no host reads
        return _stack_values(tops, triangular, splits) * scale
    values = part.new_zeros(part.shape[0], len(splits), widest, dtype=part.real.dtype)
    certified = torch.zeros(part.shape[0], len(splits), dtype=torch.bool, device=part.device)
    # |R_kk| bound the condition number from below: a channel failing it skips the Gram try
    diagonal = triangular.diagonal(dim1=-2, dim2=-1).abs()
    hopeful = (diagonal.amin(-1) ** 2 >= _GRAM_MIN_RATIO * diagonal.amax(-1) ** 2).nonzero().flatten()
    if hopeful.numel():
        values[hopeful], certified[hopeful] = _gram_values(tops[hopeful], triangular[hopeful], splits)
    redo = (~certified).any(dim=1).nonzero().flatten()  # channels with any uncertified split
    if redo.numel():
        values[redo] = _stack_values(tops[redo], triangular[redo], splits)
    return values * scale


def _gram_values(tops: torch.Tensor, triangular: torch.Tensor,
                 splits: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[m, g, b]`` square roots of the eigenvalues of each split's Gram matrix ``H_i^H H_i`` (padded
    to ``b x b``), and ``[m, g]`` whether each split is well enough conditioned to trust them.

    ``tops`` is ``[m, b - i_0, b]`` (rows ``i_0 .. b-1`` of ``T``), ``triangular`` the ``[m, b, b]``
    factor of ``T[b:, :b]``. ``eigvalsh`` of a Gram matrix costs about half an SVD, but rounding
    perturbs each eigenvalue by about ``eps * sigma_max^2``, so ``sigma_k`` is off by about
    ``eps * (sigma_max / sigma_k)^2`` relative. A split is certified only if its smallest eigenvalue
    is at least ``_GRAM_MIN_RATIO`` times its largest (condition number at most 1000: every singular
    value within about ``2e-10`` relative) and its Gram matrix neither underflowed nor overflowed.
    """
    first, widest = splits[0], splits[-1]
    bottom = triangular.mH @ triangular  # [m, b, b]; its leading i x i block is R[:i, :i]^H R[:i, :i]
    grams = tops.new_zeros(tops.shape[0], len(splits), widest, widest)
    for k, split in enumerate(splits):
        top = tops[:, split - first:, :split]
        grams[:, k, :split, :split] = bottom[:, :split, :split] + top.mH @ top
    ascending = torch.linalg.eigvalsh(grams)  # [m, g, b]; the b - i padding values are ~0
    first_real = widest - torch.tensor(splits, device=tops.device)
    smallest = ascending.gather(-1, first_real.expand(ascending.shape[:-1])[..., None])[..., 0]
    largest = ascending[..., -1]
    floor = torch.finfo(ascending.dtype).tiny / torch.finfo(ascending.dtype).eps
    certified = (smallest >= _GRAM_MIN_RATIO * largest) & (largest >= floor) & torch.isfinite(largest)
    return ascending.flip(-1).clamp_min(0).sqrt(), certified


def _stack_values(tops: torch.Tensor, triangular: torch.Tensor, splits: tuple[int, ...]) -> torch.Tensor:
    """``[m, g, b]`` singular values of the group's ``[T[i:b, :i]; R[:i, :i]]`` stacks (exact SVD)."""
    first, widest = splits[0], splits[-1]
    stacks = tops.new_zeros(tops.shape[0], len(splits), widest, widest)
    for k, split in enumerate(splits):
        stacks[:, k, : widest - split, :split] = tops[:, split - first:, :split]
        stacks[:, k, widest - split:, :split] = triangular[:, :split, :split]
    return torch.linalg.svdvals(stacks)


def _fit(values: torch.Tensor, rank: int) -> torch.Tensor:
    """Truncate or zero-pad the last dimension to ``rank``."""
    width = values.shape[-1]
    if width >= rank:
        return values[..., :rank]
    return torch.nn.functional.pad(values, (0, rank - width))
