"""Gradients of entropy-ESS: gradcheck, agreement of the routes, finiteness on degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import random_causal, random_realization
from torch.autograd import gradcheck

from ess_reg import DenseOperator, DiagonalRealization, average_ess, ess_curve


def _leaves(*tensors):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in tensors)


def test_gradcheck_dense_route_on_matrix():
    matrix = random_causal(2, 9, seed=1).requires_grad_()
    assert gradcheck(lambda m: ess_curve(DenseOperator(m)), (matrix,))


@pytest.mark.parametrize("decay", ["diagonal", "scalar", None])
@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_gradcheck_realization(decay, complex_, method):
    c, b, ld = _leaves(*random_realization(2, 10, 3, decay=decay, complex_=complex_, seed=4))
    inputs = tuple(t for t in (c, b, ld) if t is not None)

    def fn(*args):
        return ess_curve(DiagonalRealization(*args), method=method)

    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("complex_", [False, True])
@pytest.mark.parametrize("splits", [None, 4])
def test_gramian_gradient_equals_dense_gradient(complex_, splits):
    factors = random_realization(3, 26, 4, complex_=complex_, seed=6)
    grads = []
    for method in ("dense", "gramian"):
        leaves = _leaves(*factors)
        average_ess(DiagonalRealization(*leaves), splits=splits, method=method).sum().backward()
        grads.append([t.grad for t in leaves])
    for dense_grad, gramian_grad in zip(*grads, strict=True):
        torch.testing.assert_close(gramian_grad, dense_grad, rtol=1e-6, atol=1e-9)


def _finite_grads(tensors):
    return all(t.grad is not None and torch.isfinite(t.grad).all() for t in tensors)


@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_finite_gradients_on_rank_deficient_realization(method):
    c, b, ld = random_realization(2, 20, 6, seed=2)
    b[..., 3:] = 0  # only 3 of 6 states are ever written
    c[..., :1] = 0
    leaves = _leaves(c, b, ld)
    average_ess(DiagonalRealization(*leaves), method=method).sum().backward()
    assert _finite_grads(leaves)


@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_finite_gradients_with_repeated_singular_values(method):
    """Linear attention with one-hot features: many split blocks have equal singular values."""
    length, n = 16, 4
    eye = torch.eye(n, dtype=torch.float64)
    features = eye[torch.arange(length) % n][None]
    leaves = _leaves(features, features)
    curve = ess_curve(DiagonalRealization(*leaves), method=method)
    curve.sum().backward()
    assert _finite_grads(leaves)
    # split 8: each state written twice before and read twice after, so sigma = (2, 2, 2, 2)
    torch.testing.assert_close(curve[0, 7], torch.tensor(float(n), dtype=torch.float64))


def test_finite_gradients_dense_degenerate_matrices():
    length = 10
    shift = torch.diag(torch.ones(length - 2, dtype=torch.float64), -2)[None]  # equal sigmas
    ones = torch.ones(1, length, length, dtype=torch.float64).tril()  # rank one
    eye = torch.eye(length, dtype=torch.float64)[None]  # zero blocks
    zeros = torch.zeros(1, length, length, dtype=torch.float64)
    for matrix in (shift, ones, eye, zeros):
        leaf = matrix.clone().requires_grad_()
        ess_curve(DenseOperator(leaf)).sum().backward()
        assert torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_finite_gradients_for_splits_before_state_fills(method):
    """``i < N``: the reachable state is still rank deficient."""
    leaves = _leaves(*random_realization(2, 12, 8, seed=3))
    ess_curve(DiagonalRealization(*leaves), splits=[1, 2, 3], method=method).sum().backward()
    assert _finite_grads(leaves)


@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_zero_operator_has_zero_finite_gradient(method):
    c, b, ld = random_realization(1, 8, 2)
    leaves = _leaves(torch.zeros_like(c), b, ld)
    curve = ess_curve(DiagonalRealization(*leaves), method=method)
    assert (curve == 0).all()
    curve.sum().backward()
    assert _finite_grads(leaves[:2])


def test_half_precision_gradients_flow_back():
    matrix = random_causal(1, 12).half().requires_grad_()
    ess_curve(DenseOperator(matrix)).sum().backward()
    assert matrix.grad.dtype == torch.float16 and torch.isfinite(matrix.grad).all()


def test_tolerance_kind_carries_no_graph():
    leaves = _leaves(*random_realization(1, 8, 2))
    assert not ess_curve(DiagonalRealization(*leaves), "tolerance").requires_grad


def test_an_exactly_zero_entry_of_a_dense_operator_gets_its_derivative():
    g = torch.Generator().manual_seed(0)
    matrix = torch.randn(1, 24, 24, generator=g, dtype=torch.float64).tril()
    matrix[0, 15, 0] = 0.0
    leaf = matrix.clone().requires_grad_()
    ess_curve(DenseOperator(leaf), splits=[8, 12]).sum().backward()
    step, plus, minus = 1e-6, matrix.clone(), matrix.clone()
    plus[0, 15, 0], minus[0, 15, 0] = step, -step
    difference = (ess_curve(DenseOperator(plus), splits=[8, 12]).sum()
                  - ess_curve(DenseOperator(minus), splits=[8, 12]).sum()) / (2 * step)
    assert float(leaf.grad[0, 15, 0]) == pytest.approx(float(difference), rel=1e-6)
    assert float(leaf.grad[0, 15, 0]) != 0.0
