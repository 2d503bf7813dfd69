"""How much state a layer needs: the tolerance-ESS its operator shows on real inputs."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ess_reg.capture import capture_operators
from ess_reg.functional import resolve_splits, split_spectrum, tolerance_ess
from ess_reg.functional.ess import SAMPLED_DENSE_SPLITS, _is_long_dense
from ess_reg.functional.splits import Splits
from ess_reg.operators import Operator


def state_size_needed(
    model: nn.Module,
    *inputs: Any,
    tol: float = 1e-2,
    quantile: float = 0.95,
    splits: Splits = None,
    **kwargs: Any,
) -> dict[str, int]:
    """The state per channel each recognised layer needs on ``model(*inputs, **kwargs)``.

    For every layer, the tolerance-ESS (singular values above ``tol`` times the block's largest) of
    ``H_i`` at each observed split, channel and example; the layer needs the ``quantile`` of these
    (the "higher" order statistic), an int. At ``quantile=1`` it is the rank, at tolerance ``tol``,
    of the worst split: a state that size holds every block to that tolerance. A looser tolerance
    or a lower quantile never needs more. Compare it with the layer's TSS: far below, the state
    could shrink; at the TSS, the layer saturates and may want a larger state.

    Args:
        tol: relative tolerance in ``(0, 1)``.
        quantile: in ``(0, 1]``, over splits, channels and examples.
        splits: as in :func:`ess_reg.ess_curve` (default all; 64 evenly spaced for a long layer on
            the dense route).

    Returns:
        ``{layer name: int}`` in forward order.
    """
    if not (isinstance(tol, int | float) and 0 < tol < 1):
        raise ValueError(f"tol must lie in (0, 1), got {tol!r}")
    if not (isinstance(quantile, int | float) and 0 < quantile <= 1):
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            operators = capture_operators(model, *inputs, **kwargs)
    finally:
        model.train(was_training)
    return {name: operator_state_needed(op, tol=tol, quantile=quantile, splits=splits)
            for name, op in operators.items()}


def operator_state_needed(op: Operator, *, tol: float = 1e-2, quantile: float = 0.95,
                          splits: Splits = None) -> int:
    """:func:`state_size_needed` for one operator."""
    if splits is None and _is_long_dense(op):
        splits = SAMPLED_DENSE_SPLITS
    index = resolve_splits(splits, op.seq_len)
    with torch.no_grad():
        return needed_from_spectrum(split_spectrum(op, splits=index).values, tol=tol, quantile=quantile)


def needed_from_spectrum(values: torch.Tensor, *, tol: float = 1e-2, quantile: float = 0.95) -> int:
    """The ``quantile`` of the tolerance-ESS of split spectra ``values`` ``[..., S, R]``."""
    with torch.no_grad():
        counts = tolerance_ess(values, tol, relative=True).flatten().double()
    if counts.numel() == 0:
        return 0
    if bool(torch.isnan(counts).any()):  # a non-finite operator, checked on an accelerator
        raise ValueError("the operator holds NaN or Inf values (a diverged layer?); the state it needs "
                         "is undefined. Check the model's activations")
    ordered = counts.sort().values
    position = max(0, math.ceil(quantile * ordered.numel()) - 1)
    return round(float(ordered[position]))
