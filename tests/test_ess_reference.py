"""ESS and split spectra against an independent float64 numpy reference (per-split SVD loop)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import (
    random_causal,
    random_realization,
    reference_curve,
    reference_matrix,
    reference_singular_values,
)

from ess_reg import (
    DenseOperator,
    DiagonalRealization,
    average_ess,
    ess_curve,
    split_singular_values,
    theoretical_state_size,
    total_ess,
    utilization,
)

DENSE_RTOL = 1e-8
GRAMIAN_RTOL = 1e-6
KINDS = ["entropy", "tolerance"]


def _realizations():
    yield "diagonal", random_realization(3, 24, 4, seed=11)
    yield "scalar", random_realization(2, 24, 3, decay="scalar", seed=12)
    yield "no-decay", random_realization(2, 24, 3, decay=None, seed=13)
    yield "complex", random_realization(2, 24, 3, complex_=True, seed=14)
    yield "batched", random_realization(2, 20, 3, batch=2, seed=15)
    yield "strong-decay", random_realization(2, 30, 5, scale=4.0, seed=16)


REALIZATIONS = list(_realizations())


@pytest.mark.parametrize("kind", KINDS)
def test_dense_route_on_random_dense(kind):
    matrix = random_causal(3, 25, batch=2, seed=5)
    got = ess_curve(matrix, kind, method="dense")
    assert got.shape == (2, 3, 24)
    np.testing.assert_allclose(got.reshape(-1, 24).numpy(), reference_curve(matrix, kind),
                               rtol=DENSE_RTOL)


@pytest.mark.parametrize(("name", "factors"), REALIZATIONS, ids=[r[0] for r in REALIZATIONS])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_routes_on_random_realizations(name, factors, kind, method):
    op = DiagonalRealization(*factors)
    matrix = reference_matrix(*(None if t is None else t.reshape(-1, *t.shape[-2:])
                                for t in factors))
    expected = reference_curve(matrix, kind)
    got = ess_curve(op, kind, method=method)
    assert got.shape == (*op.shape, op.seq_len - 1)
    rtol = DENSE_RTOL if method == "dense" else GRAMIAN_RTOL
    np.testing.assert_allclose(got.reshape(expected.shape).numpy(), expected, rtol=rtol, atol=1e-12)


@pytest.mark.parametrize(("name", "factors"), REALIZATIONS, ids=[r[0] for r in REALIZATIONS])
@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_singular_values_match_reference(name, factors, method):
    op = DiagonalRealization(*factors)
    matrix = reference_matrix(*(None if t is None else t.reshape(-1, *t.shape[-2:])
                                for t in factors))
    got = split_singular_values(op, method=method).reshape(matrix.shape[0], op.seq_len - 1, -1)
    assert got.shape[-1] == min(op.state_size, op.seq_len // 2)
    for channel, spectra in enumerate(reference_singular_values(matrix)):
        for k, sigma in enumerate(spectra):
            width = min(len(sigma), got.shape[-1])
            scale = max(sigma[0], 1e-300)
            np.testing.assert_allclose(got[channel, k, :width].numpy(), sigma[:width],
                                       atol=1e-10 * scale, rtol=0)
            assert (got[channel, k, width:] == 0).all()


@pytest.mark.parametrize("splits", [5, [3, 1, 17, 3], torch.tensor([12, 2]), np.array([4, 9])])
@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_sampled_splits(splits, method):
    factors = random_realization(2, 21, 3, seed=2)
    op = DiagonalRealization(*factors)
    full = ess_curve(op, method="dense")
    got = ess_curve(op, splits=splits, method=method)
    index = ([1 + int((m + 0.5) * 20 / 5) for m in range(5)] if isinstance(splits, int)
             else [int(s) for s in splits])
    np.testing.assert_allclose(got.numpy(), full[:, [i - 1 for i in index]].numpy(), rtol=1e-9)


def test_int_splits_are_evenly_spaced():
    from ess_reg.functional import resolve_splits

    assert resolve_splits(1, 101).tolist() == [51]
    assert resolve_splits(4, 101).tolist() == [13, 38, 63, 88]
    assert resolve_splits(500, 6).tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("relative", [True, False])
@pytest.mark.parametrize("tol", [1e-8, 1e-2, 0.5])
def test_tolerance_options(tol, relative):
    matrix = random_causal(2, 16, seed=9) * 0.3
    got = ess_curve(matrix, "tolerance", tol=tol, relative=relative)
    expected = reference_curve(matrix, "tolerance", tol=tol, relative=relative)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_float32_and_half_inputs_are_upcast_and_cast_back():
    matrix = random_causal(2, 16, seed=4)
    expected = reference_curve(matrix.float().double(), "entropy")
    got32 = ess_curve(matrix.float())
    assert got32.dtype == torch.float32
    np.testing.assert_allclose(got32.numpy(), expected, rtol=1e-6)
    for low in (torch.float16, torch.bfloat16):
        got = ess_curve(matrix.to(low))
        assert got.dtype == low
        exact = reference_curve(matrix.to(low).double(), "entropy")
        np.testing.assert_allclose(got.double().numpy(), exact, rtol=1e-2)
    factors = [t.half() for t in random_realization(2, 16, 3)]
    got = ess_curve(DiagonalRealization(*factors))
    assert got.dtype == torch.float16 and torch.isfinite(got).all()


def test_float32_compute_dtype():
    matrix = random_causal(2, 16, seed=4)
    got = ess_curve(matrix, dtype=torch.float32)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), reference_curve(matrix), rtol=1e-4)


def test_aggregates():
    factors = random_realization(3, 18, 4, batch=2, seed=8)
    op = DiagonalRealization(*factors)
    curve = ess_curve(op)
    torch.testing.assert_close(average_ess(op), curve.mean(-1))
    torch.testing.assert_close(total_ess(op), curve.mean(-1).sum(-1).mean())
    torch.testing.assert_close(utilization(op), curve.mean(-1) / 4)
    assert theoretical_state_size(op) == 4
    assert theoretical_state_size(op, total=True) == 12
    dense = DenseOperator(random_causal(2, 12))
    assert theoretical_state_size(dense) is None
    bound = torch.tensor([min(i, 12 - i) for i in range(1, 12)], dtype=torch.float64)
    torch.testing.assert_close(utilization(dense), (ess_curve(dense) / bound).mean(-1))
    tol_util = utilization(dense, "tolerance", tol=1e-10)
    torch.testing.assert_close(tol_util, torch.ones(2, dtype=torch.float64))


def test_auto_route_choice_agrees_with_both_routes():
    op = DiagonalRealization(*random_realization(2, 40, 3, seed=21))
    auto = ess_curve(op)
    torch.testing.assert_close(auto, ess_curve(op, method="gramian"))
    torch.testing.assert_close(auto, ess_curve(op, method="dense"), rtol=1e-9, atol=1e-12)
