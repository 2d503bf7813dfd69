"""state_size_needed: the state a layer's operator needs, at a tolerance, over observed splits."""

from __future__ import annotations

import pytest
import torch

from ess_reg import DiagonalRealization, state_size_needed
from ess_reg.models import SequenceModel
from ess_reg.sizing import operator_state_needed


def _realization(n: int, length: int = 24, channels: int = 3) -> DiagonalRealization:
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, channels, length, n, generator=g, dtype=torch.float64)
    b = torch.randn(1, channels, length, n, generator=g, dtype=torch.float64)
    rates = torch.linspace(0.05, 0.5, n, dtype=torch.float64)
    log_decay = (-rates).expand(1, channels, length, n).clone()
    return DiagonalRealization(c, b, log_decay)


def test_known_answers():
    op = _realization(3)
    assert operator_state_needed(op, tol=1e-6, quantile=1.0) == 3  # full rank 3 in the middle
    assert operator_state_needed(op, tol=1e-6, quantile=1.0, splits=[1, 23]) == 1  # edge splits
    assert operator_state_needed(op, tol=1e-6, quantile=0.05, splits=[1, 12, 23]) == 1
    low = DiagonalRealization(op.c[..., :1].expand(-1, -1, -1, 3).contiguous(),
                              op.b[..., :1].expand(-1, -1, -1, 3).contiguous(),
                              torch.full_like(op.log_decay, -0.1))
    assert operator_state_needed(low, tol=1e-6, quantile=1.0) == 1  # rank one however large N


def test_looser_tolerance_or_lower_quantile_never_needs_more():
    op = _realization(6, length=32)
    needs = [operator_state_needed(op, tol=t, quantile=q) for t in (1e-8, 1e-4, 1e-2, 0.3)
             for q in (1.0, 0.9, 0.5)]
    table = torch.tensor(needs).reshape(4, 3)
    assert (table[1:] <= table[:-1]).all() and (table[:, 1:] <= table[:, :-1]).all()


def test_on_a_model():
    torch.manual_seed(0)
    model = SequenceModel(["gla", "s6"], d_model=16, n_layers=2, vocab_size=32)
    ids = torch.randint(0, 32, (2, 20))
    needed = state_size_needed(model, ids)
    assert list(needed) == ["blocks.0.mixer", "blocks.1.mixer"]
    tss = {f"blocks.{i}.mixer": model.blocks[i].mixer.state_size for i in range(2)}
    assert all(isinstance(v, int) and 1 <= v <= tss[k] for k, v in needed.items())
    assert model.training  # restored
    with pytest.raises(ValueError, match="tol must lie in"):
        state_size_needed(model, ids, tol=0)
    with pytest.raises(ValueError, match="quantile must lie in"):
        state_size_needed(model, ids, quantile=1.5)
