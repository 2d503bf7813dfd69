"""Per-operator ESS summaries: the functional core behind ``ESSMetric`` and ``diagnose``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from ess_reg.functional.ess import DEFAULT_TOL, split_capacity, split_spectrum
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
    capacity = split_capacity(op, index).to(sigma.device, dtype)
    batch, channels, count = sigma.shape[0], sigma.shape[1], index.numel()
    device = sigma.device
    stats = {  # on the operator's device: nothing here waits for the device to finish
        "count": torch.tensor(float(batch * channels * count), dtype=dtype, device=device),
        "samples": torch.tensor(float(batch), dtype=dtype, device=device),
        "curve_count": torch.tensor(float(batch * channels), dtype=dtype, device=device),
    }
    for kind in kinds:
        curve = entropy_ess(sigma) if kind == "entropy" else tolerance_ess(sigma, tol, relative=relative)
        curve = curve.detach().to(dtype)  # [B, C, S]
        stats[f"{kind}_sum"] = curve.sum()
        stats[f"{kind}_util_sum"] = (curve / capacity).sum()
        stats[f"{kind}_total_sum"] = curve.mean(-1).sum()
        stats[f"{kind}_curve_sum"] = curve.sum(dim=(0, 1))
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
    (mean ESS at each split, ``[S]``). Values are detached float64 tensors on the CPU."""
    if kind not in ("entropy", "tolerance"):
        raise ValueError(f"kind must be 'entropy' or 'tolerance', got {kind!r}")
    op = as_operator(operator)
    stats = _ess_update(op, (kind,), splits=splits, tol=tol, relative=relative, dtype=dtype)
    values = {key: value.cpu() for key, value in _ess_compute(stats, kind).items()}
    return {**values, "tss": op.state_size}
