r"""Square-root sweeps of the Gramian route: triangular roots of ``P_k`` or ``Q_k`` at every split.

A sweep visits segments of rows (inputs between two splits going forward, outputs between two
splits going backward). The root at segment ``k`` is the ``N' x N'`` triangular QR factor of

    [ root of the previous segment, decayed to k's anchor ;  rows of segment k ]

where each row arrives already decayed to its own segment's anchor ``G_k`` (a log-decay cumsum
value, kept in float64 or complex128 whatever the compute dtype, so long sequences with strong
resets keep the small decays exact), and decaying from anchor ``k'`` to ``k`` multiplies column ``n`` by
``exp(sign * (G_k - G_k'))`` (``sign`` is ``+1`` forward, ``-1`` backward; the exponent is never
positive for a stable realization, so nothing overflows).

One QR per segment costs one LAPACK call each, which dominates for short segments (all splits of
a few channels). Consecutive short segments are therefore grouped into *blocks*: the roots that end
a block are carried from block to block (one QR per block), and the roots inside all blocks then
come from a single batched QR of ``[carried root ; block rows up to k]``, each row decayed straight
to ``k``'s anchor. Blocks are only formed while the batch is small and stay short in rows, so the
extra arithmetic is a small multiple of ``N'^3`` per split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ess_reg.functional._scaling import flush_below, flush_subnormal, normalize_channels

#: Blocks form only while a QR call would hold fewer than about this many matrices.
BLOCK_MATRICES = 16
#: At most this many rows (inputs or outputs) in a block of several segments.
BLOCK_ROWS = 16


@dataclass(frozen=True)
class SweepPlan:
    """Index bookkeeping of one sweep (numpy, built once per call).

    Segments are numbered ``0 .. S-1`` in time order; the sweep visits them forward or backward.
    """

    sign: float
    segment_lo: np.ndarray  # [S] first row (time index) of each segment
    segment_hi: np.ndarray  # [S] one past its last row
    block_lo: np.ndarray  # [B] first row of each block, blocks in sweep order
    block_hi: np.ndarray  # [B]
    block_last: np.ndarray  # [B] segment that ends each block (sweep order)
    block_of: np.ndarray  # [S] block of each segment

    @classmethod
    def build(cls, bounds: list[int], forward: bool, batch: int) -> SweepPlan:
        """``bounds = [0, s_1, ..., s_S, L]``; forward segments hold inputs ``[s_{k-1}, s_k)``,
        backward ones outputs ``[s_k, s_{k+1})``."""
        edges = np.asarray(bounds, dtype=np.int64)
        lo, hi = (edges[:-2], edges[1:-1]) if forward else (edges[1:-1], edges[2:])
        count = lo.size
        order = range(count) if forward else range(count - 1, -1, -1)
        most = max(1, BLOCK_MATRICES // max(1, batch))
        block_of = np.empty(count, dtype=np.int64)
        sizes = (hi - lo).tolist()
        blocks, members, rows = -1, most, 0
        for k in order:
            if members < most and rows + sizes[k] <= BLOCK_ROWS:
                members, rows = members + 1, rows + sizes[k]
            else:
                blocks, members, rows = blocks + 1, 1, sizes[k]
            block_of[k] = blocks
        total = blocks + 1
        block_lo = np.full(total, np.iinfo(np.int64).max)
        block_hi = np.zeros(total, dtype=np.int64)
        np.minimum.at(block_lo, block_of, lo)
        np.maximum.at(block_hi, block_of, hi)
        block_last = np.empty(total, dtype=np.int64)
        visited = np.arange(count) if forward else np.arange(count)[::-1]
        block_last[block_of[visited]] = visited  # later visits overwrite: the block's last member
        return cls(1.0 if forward else -1.0, lo, hi, block_lo, block_hi, block_last, block_of)

    @property
    def count(self) -> int:
        return self.segment_lo.size

    def owners(self, length: int) -> np.ndarray:
        """``[L]`` segment of each row, ``-1`` for rows no segment holds."""
        owner = np.full(length, -1, dtype=np.int64)
        first, stop = int(self.segment_lo[0]), int(self.segment_hi[-1])
        owner[first:stop] = np.repeat(np.arange(self.count), self.segment_hi - self.segment_lo)
        return owner

    def inner(self) -> np.ndarray:
        """Segments that are not the last of their block."""
        return np.setdiff1d(np.arange(self.count), self.block_last, assume_unique=True)


def square_root_sweep(
    rows: torch.Tensor, anchor_log: torch.Tensor | None, bounds: list[int], forward: bool
) -> torch.Tensor:
    """Triangular roots ``[M, S, N', N']`` of one sweep (no autograd).

    Args:
        rows: ``[M, L, N']``, each row decayed to its own segment's anchor.
        anchor_log: ``[M, S, N']`` log-decay cumsum at each split's anchor ``s_k - 1``, or None
            (no decay).
        bounds: ``[0, s_1, ..., s_S, L]``.
        forward: forward (inputs, controllability) or backward (outputs, observability) sweep.
    """
    batch, length, n = rows.shape
    device = rows.device
    plan = SweepPlan.build(bounds, forward, batch)
    lasts = torch.from_numpy(plan.block_last).to(device)
    to_end = rows  # rows decayed to their block's last anchor (their own, for one-segment blocks)
    shifts = None
    if anchor_log is not None:
        shifts = torch.exp(plan.sign * (anchor_log[:, lasts[1:]] - anchor_log[:, lasts[:-1]])).to(rows.dtype)
    if anchor_log is not None and plan.block_lo.size < plan.count:
        owner = torch.from_numpy(plan.owners(length)).to(device)
        used = owner >= 0
        owner = owner.clamp(min=0)
        end = torch.from_numpy(plan.block_last[plan.block_of]).to(device)[owner]
        exponent = plan.sign * (anchor_log[:, end] - anchor_log[:, owner])
        to_end = rows * masked_exp(exponent, used[None, :, None]).to(rows.dtype)

    out = rows.new_empty(batch, plan.count, n, n)
    root: torch.Tensor | None = None
    for block, (lo, hi) in enumerate(zip(plan.block_lo.tolist(), plan.block_hi.tolist(), strict=True)):
        stacked = to_end[:, lo:hi]
        if root is not None:
            carried = root if shifts is None else root * shifts[:, block - 1, None, :]
            stacked = torch.cat([carried, stacked], dim=1)
        root = triangular_factor(stacked, n)
        out[:, plan.block_last[block]] = root
    targets = plan.inner()
    if targets.size:
        out[:, torch.from_numpy(targets).to(device)] = _inner_roots(
            rows, anchor_log, plan, targets, out[:, lasts])
    return out


def _inner_roots(
    rows: torch.Tensor, anchor_log: torch.Tensor | None, plan: SweepPlan, targets: np.ndarray,
    ends: torch.Tensor,
) -> torch.Tensor:
    """``[M, T, N', N']`` roots of the segments inside blocks, from one batched QR."""
    device, n = rows.device, rows.shape[-1]
    block = plan.block_of[targets]  # [T]
    lo = plan.block_lo[block]
    width = int((plan.block_hi[block] - lo).max())
    time = lo[:, None] + np.arange(width)[None, :]  # [T, r]
    valid = time < plan.block_hi[block][:, None]
    time = np.minimum(time, plan.block_hi[block][:, None] - 1)
    owner = np.searchsorted(plan.segment_hi, time, side="right")  # segment holding each row
    keep = valid & (plan.sign * (targets[:, None] - owner) >= 0)  # rows of members up to target
    gathered = rows[:, torch.from_numpy(time).to(device)]  # [M, T, r, N']
    keep_t = torch.from_numpy(keep).to(device)[None, :, :, None]
    index = torch.from_numpy(targets).to(device)
    has_carry = torch.from_numpy(block > 0).to(device)
    source = torch.from_numpy(np.maximum(block - 1, 0)).to(device)
    previous = ends[:, source] * has_carry[None, :, None, None]  # [M, T, n, n]
    if anchor_log is None:
        stacked = gathered * keep_t
        carried = previous
    else:
        owner_t = torch.from_numpy(owner).to(device)
        exponent = plan.sign * (anchor_log[:, index, None] - anchor_log[:, owner_t])
        stacked = gathered * masked_exp(exponent, keep_t).to(rows.dtype)
        source_anchor = torch.from_numpy(plan.block_last[np.maximum(block - 1, 0)]).to(device)
        shift = plan.sign * (anchor_log[:, index] - anchor_log[:, source_anchor])
        carried = previous * masked_exp(shift, has_carry[None, :, None])[:, :, None, :].to(rows.dtype)
    return triangular_factor(torch.cat([carried, stacked], dim=2), n)


def triangular_factor(stacked: torch.Tensor, n: int) -> torch.Tensor:
    """A square root ``R`` of ``stacked^H stacked`` (``[..., rows, n]``): the triangular factor of
    ``stacked = Q R``, zero-padded to ``n x n`` if rows < n.

    LAPACK's Householder QR returns non-finite factors on some inputs: columns many orders of
    magnitude apart, near-duplicate columns (the conjugate halves of a complex realization with
    real factors), subnormal entries (complex QR in particular). On CPU a non-finite factor is
    detected and recomputed by :func:`_robust_root`; accelerators, which should not wait for that
    check, always take the robust path.
    """
    if stacked.device.type == "cpu":
        root = torch.linalg.qr(stacked, mode="r")[1]
        if not bool(torch.isfinite(root.sum())):  # NaN and Inf reach the sum; roots cannot overflow it
            root = _robust_root(stacked)
    else:
        root = _robust_root(stacked)
    if root.shape[-2] < n:
        root = torch.nn.functional.pad(root, (0, 0, 0, n - root.shape[-2]))
    return root


def _robust_root(stacked: torch.Tensor) -> torch.Tensor:
    """``R`` of ``stacked = Q R`` with columns scaled by powers of two to a largest entry of about 1
    (``A D = Q (R D)``: exact, undone on ``R``) and entries below ``eps^2`` of their column's largest
    flushed to zero (far inside the factorization's own backward error, ``eps`` per column). On CPU
    a factor that is still not finite is recomputed in double precision, as QR or else as
    ``diag(s) V^H`` from the SVD (an equally valid square root)."""
    scaled, exponent = normalize_channels(stacked, (-2,))  # per column; exponent [..., n]
    scaled = flush_below(scaled, torch.finfo(scaled.dtype).eps ** 2)
    root = torch.linalg.qr(scaled, mode="r")[1]
    if stacked.device.type == "cpu" and not bool(torch.isfinite(root).all()):
        wide = scaled.to(torch.complex128 if scaled.is_complex() else torch.float64)
        root = torch.linalg.qr(wide, mode="r")[1]
        if not bool(torch.isfinite(root).all()):
            _, values, right_h = torch.linalg.svd(wide, full_matrices=False)
            root = values.to(right_h.dtype)[..., :, None] * right_h
        root = root.to(scaled.dtype)
    return flush_subnormal(root * torch.exp2(exponent).to(root.real.dtype)[..., None, :])


def masked_exp(exponent: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``exp(exponent)`` where ``keep`` (broadcastable to ``exponent``), else exactly 0."""
    zero = torch.zeros((), dtype=exponent.dtype, device=exponent.device)
    return torch.where(keep, torch.exp(torch.where(keep, exponent, zero)), zero)
