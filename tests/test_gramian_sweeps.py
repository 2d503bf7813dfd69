"""Blocked square-root sweeps of the Gramian route against the plain per-split recursion."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_realization

from ess_reg import DiagonalRealization, split_singular_values
from ess_reg.functional import _sweeps

SPLIT_PATTERNS = {
    "all": None,
    "mixed-gaps": [1, 2, 3, 9, 10, 11, 12, 30, 31, 44, 45, 46, 47],
    "ends": [1, 47],
    "one": [24],
}


@pytest.fixture(params=[(16, 16), (4, 8), (1, 1), (64, 64)], ids=lambda p: f"block{p}")
def block_sizes(request, monkeypatch):
    matrices, rows = request.param
    monkeypatch.setattr(_sweeps, "BLOCK_MATRICES", matrices)
    monkeypatch.setattr(_sweeps, "BLOCK_ROWS", rows)
    return request.param


@pytest.mark.parametrize("pattern", list(SPLIT_PATTERNS))
@pytest.mark.parametrize(("decay", "complex_"), [("diagonal", False), ("scalar", False),
                                                 (None, False), ("diagonal", True)])
def test_blocked_sweeps_match_the_dense_route(block_sizes, pattern, decay, complex_):
    op = DiagonalRealization(*random_realization(1, 48, 5, decay=decay, complex_=complex_, seed=3))
    splits = SPLIT_PATTERNS[pattern]
    dense = split_singular_values(op, splits=splits, method="dense")
    gramian = split_singular_values(op, splits=splits, method="gramian")
    width = gramian.shape[-1]
    np.testing.assert_allclose(gramian.numpy(), dense[..., :width].numpy(),
                               atol=1e-9 * float(dense.max()))


def test_roots_square_to_the_gramians(block_sizes):
    _, b, log_decay = random_realization(2, 40, 4, seed=4)
    cum = torch.cumsum(log_decay, dim=-2)
    splits = [1, 2, 3, 5, 8, 13, 21, 34, 39]
    bounds = [0, *splits, 40]
    anchors = torch.tensor(splits) - 1
    # forward rows: inputs decayed to the end of their segment (the next split's anchor)
    segment = np.searchsorted(splits, np.arange(40), side="right").clip(max=len(splits) - 1)
    end = anchors[segment]
    rows = b * torch.exp(cum[:, end] - cum) * (torch.arange(40) < splits[-1])[None, :, None]
    roots = _sweeps.square_root_sweep(rows, cum[:, anchors], bounds, forward=True)
    for k, s in enumerate(splits):
        reach = b[:, :s] * torch.exp(cum[:, s - 1:s] - cum[:, :s])  # [M, s, N]
        np.testing.assert_allclose((roots[:, k].mT @ roots[:, k]).numpy(),
                                   (reach.mT @ reach).numpy(), atol=1e-12)


def test_vanishing_decays_stay_finite(block_sizes):
    c, b, _ = random_realization(1, 40, 3, seed=5)
    log_decay = torch.full((1, 40, 3), -800.0, dtype=torch.float64)  # exp underflows to zero
    values = split_singular_values(DiagonalRealization(c, b, log_decay), method="gramian")
    assert torch.isfinite(values).all()
    dense = split_singular_values(DiagonalRealization(c, b, log_decay), method="dense")
    np.testing.assert_allclose(values.numpy(), dense[..., :values.shape[-1]].numpy(), atol=1e-12)
