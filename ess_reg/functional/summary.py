"""Per-operator ESS summaries: the functional core behind ``ESSMetric`` and ``diagnose``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from ess_reg.functional.ess import DEFAULT_TOL, split_spectrum
from ess_reg.functional.spectrum import entropy_ess, tolerance_ess
from ess_reg.functional.splits import Splits, resolve_splits
from ess_reg.operators import Operator, as_operator

SummaryKind = Literal["entropy", "tolerance"]


def _ess_update(
    operator: Operator | torch.Tensor,
    kinds: tuple[str, ...] = ("entropy",),
    *,
    splits: Splits = None,
    tol: float = DEFAULT_TOL,
    relative: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    """Sufficient statistics of one operator (sums, so they add across batches and ranks).

    For each kind ``k``: ``{k}_sum`` (ESS summed over samples, channels and splits),
    ``{k}_util_sum`` (ESS / capacity summed likewise), ``{k}_total_sum`` (per-sample total ESS,
    summed over samples), ``{k}_curve_sum`` (``[S]``, summed over samples and channels); plus
    ``count`` (samples x channels x splits), ``samples`` and ``curve_count`` (samples x channels).
    Capacity is the TSS ``N``, or ``min(i, L - i)`` for an operator without a finite state.
    """
    op = as_operator(operator)
    index = resolve_splits(splits, op.seq_len)
    spectrum = split_spectrum(op, splits=index, dtype=dtype)
    sigma = spectrum.values if relative else spectrum.singular_values()  # float64: no underflow
    sigma = sigma.reshape(-1, op.num_channels, *sigma.shape[-2:])  # [B, C, S, R]
    if op.state_size is not None:
        capacity = torch.full((index.numel(),), float(op.state_size), dtype=dtype)
    else:
        capacity = torch.minimum(index, op.seq_len - index).to(dtype)
    capacity = capacity.to(sigma.device)
    batch, channels, count = sigma.shape[0], sigma.shape[1], index.numel()
    stats = {
        "count": torch.tensor(float(batch * channels * count), dtype=dtype),
        "samples": torch.tensor(float(batch), dtype=dtype),
        "curve_count": torch.tensor(float(batch * channels), dtype=dtype),
    }
    for kind in kinds:
        curve = entropy_ess(sigma) if kind == "entropy" else tolerance_ess(sigma, tol, relative=relative)
        curve = curve.detach().to(dtype)  # [B, C, S]
        stats[f"{kind}_sum"] = curve.sum().cpu()
        stats[f"{kind}_util_sum"] = (curve / capacity).sum().cpu()
        stats[f"{kind}_total_sum"] = curve.mean(-1).sum().cpu()
        stats[f"{kind}_curve_sum"] = curve.sum(dim=(0, 1)).cpu()
    return stats


def _ess_compute(stats: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """``ess`` (mean per channel), ``total_ess`` (summed over channels), ``utilization``, ``curve``."""
    return {
        "ess": stats[f"{kind}_sum"] / stats["count"],
        "total_ess": stats[f"{kind}_total_sum"] / stats["samples"],
        "utilization": stats[f"{kind}_util_sum"] / stats["count"],
        "curve": stats[f"{kind}_curve_sum"] / stats["curve_count"],
    }


def ess_summary(
    operator: Operator | torch.Tensor,
    kind: SummaryKind = "entropy",
    *,
    splits: Splits = None,
    tol: float = DEFAULT_TOL,
    relative: bool = True,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor | int | None]:
    """One operator's ESS summary: ``ess`` (average per channel: mean over splits, channels and
    samples), ``total_ess`` (summed over channels, mean over samples), ``utilization`` (ESS / TSS, or
    ESS_i / ``min(i, L - i)`` without a finite state), ``tss`` (per channel, or None) and ``curve``
    (mean ESS at each split, ``[S]``). Values are detached float64 tensors."""
    if kind not in ("entropy", "tolerance"):
        raise ValueError(f"kind must be 'entropy' or 'tolerance', got {kind!r}")
    op = as_operator(operator)
    stats = _ess_update(op, (kind,), splits=splits, tol=tol, relative=relative, dtype=dtype)
    return {**_ess_compute(stats, kind), "tss": op.state_size}
