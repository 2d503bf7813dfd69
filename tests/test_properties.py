"""Property tests (hypothesis): invariances and bounds of ESS."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from ess_reg import DenseOperator, DiagonalRealization, ess_curve

seeds = st.integers(0, 2**31 - 1)


def _realization(seed, length, n, decay_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(2, length, n, generator=g, dtype=torch.float64)
    b = torch.randn(2, length, n, generator=g, dtype=torch.float64)
    ld = -decay_scale * torch.rand(2, length, n, generator=g, dtype=torch.float64)
    return c, b, ld, g


@given(seed=seeds, length=st.integers(2, 18), scale=st.floats(1e-3, 1e3))
def test_entropy_ess_is_scale_invariant(seed, length, scale):
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(2, length, length, generator=g, dtype=torch.float64).tril()
    torch.testing.assert_close(ess_curve(matrix * scale), ess_curve(matrix), rtol=1e-9, atol=0)


@given(seed=seeds, length=st.integers(3, 18), n=st.integers(1, 5),
       method=st.sampled_from(["dense", "gramian"]))
def test_exact_rank_is_invariant_under_positive_scalings(seed, length, n, method):
    c, b, ld, g = _realization(seed, length, n, decay_scale=0.5)
    rows = 0.2 + 4.8 * torch.rand(2, length, 1, generator=g, dtype=torch.float64)
    cols = 0.2 + 4.8 * torch.rand(2, length, 1, generator=g, dtype=torch.float64)
    plain = ess_curve(DiagonalRealization(c, b, ld), "tolerance", tol=1e-9, method=method)
    scaled_op = DiagonalRealization(c * rows, b * cols, ld)
    scaled = ess_curve(scaled_op, "tolerance", tol=1e-9, method=method)
    torch.testing.assert_close(scaled, plain)
    matrix = DiagonalRealization(c, b, ld).dense()
    dense_scaled = DenseOperator(rows * matrix * cols.mT)
    torch.testing.assert_close(ess_curve(dense_scaled, "tolerance", tol=1e-9), plain)


@given(seed=seeds, length=st.integers(2, 20), n=st.integers(1, 6),
       kind=st.sampled_from(["entropy", "tolerance"]),
       method=st.sampled_from(["auto", "dense", "gramian"]))
def test_ess_is_bounded_by_block_shape_and_state(seed, length, n, kind, method):
    c, b, _, _ = _realization(seed, length, n)
    curve = ess_curve(DiagonalRealization(c, b), kind, method=method)
    split = torch.arange(1, length, dtype=torch.float64)
    bound = torch.minimum(torch.minimum(split, length - split), torch.tensor(float(n)))
    assert (curve <= bound + 1e-9).all()
    assert (curve >= 0).all()


@given(seed=seeds, length=st.integers(2, 14), n=st.integers(1, 4),
       zero_fraction=st.floats(0, 1), method=st.sampled_from(["dense", "gramian"]))
def test_gradients_are_always_finite(seed, length, n, zero_fraction, method):
    c, b, ld, g = _realization(seed, length, n)
    keep = (torch.rand(2, length, n, generator=g) >= zero_fraction).double()
    leaves = [t.clone().requires_grad_() for t in (c * keep, b, ld)]
    curve = ess_curve(DiagonalRealization(*leaves), method=method)
    assert torch.isfinite(curve).all()
    curve.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)
