"""Exact known answers: linear attention, softmax attention, identity, LTI Hankel values."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.linalg import cholesky, solve_discrete_lyapunov, svdvals

from ess_reg import DenseOperator, DiagonalRealization, ess_curve, split_singular_values


def _edge_bound(length: int, cap: int | None = None) -> np.ndarray:
    bound = np.minimum(np.arange(1, length), length - np.arange(1, length))
    return bound if cap is None else np.minimum(bound, cap)


@pytest.mark.parametrize("d", [1, 4, 7])
@pytest.mark.parametrize("method", ["dense", "gramian"])
def test_linear_attention_rank_is_min_i_l_minus_i_d(d, method):
    length = 24
    g = torch.Generator().manual_seed(d)
    q = torch.nn.functional.elu(torch.randn(2, length, d, generator=g, dtype=torch.float64)) + 1
    k = torch.nn.functional.elu(torch.randn(2, length, d, generator=g, dtype=torch.float64)) + 1
    normalizer = (q * k.cumsum(1)).sum(-1, keepdim=True)  # row scaling keeps the rank
    op = DiagonalRealization(q / normalizer, k)
    got = ess_curve(op, "tolerance", tol=1e-9, method=method)
    np.testing.assert_array_equal(got.numpy(), np.broadcast_to(_edge_bound(length, d), (2, 23)))


def _softmax_attention(length: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, length, dim, generator=g, dtype=torch.float64)
    k = torch.randn(2, length, dim, generator=g, dtype=torch.float64)
    scores = q @ k.mT / dim**0.5
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~mask, -torch.inf), dim=-1)


def test_random_softmax_attention_has_full_block_rank():
    length = 24
    attention = _softmax_attention(length, 32, 0)
    for tol in (1e-10, 1e-3):
        got = ess_curve(attention, "tolerance", tol=tol)
        np.testing.assert_array_equal(got.numpy(), np.broadcast_to(_edge_bound(length), (2, 23)))
    entropy = ess_curve(attention)
    assert (entropy <= torch.from_numpy(_edge_bound(length)) + 1e-9).all()
    assert ((entropy.argmax(-1) - 11).abs() <= 2).all()  # peaks mid-sequence
    assert (entropy[:, [0, -1]] == 1).all()


def test_identity_and_zero_have_zero_ess():
    eye = torch.eye(10, dtype=torch.float64).expand(3, 10, 10)
    for kind in ("entropy", "tolerance"):
        assert (ess_curve(eye, kind) == 0).all()
        assert (ess_curve(torch.zeros(1, 10, 10), kind) == 0).all()
    c = torch.zeros(1, 10, 2, dtype=torch.float64)
    assert (ess_curve(DiagonalRealization(c, torch.ones_like(c)), method="gramian") == 0).all()


def test_rank_one_operator():
    ones = DenseOperator(torch.ones(1, 12, 12, dtype=torch.float64).tril())
    np.testing.assert_allclose(ess_curve(ones).numpy(), 1.0, rtol=1e-12)


def _hankel_singular_values(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Discrete-time Hankel singular values of ``h_i = A h_{i-1} + b u_i, y_i = c^T h_i``.

    In standard form ``x_{k+1} = A x_k + B u_k, y_k = C x_k + D u_k`` with ``x_k = h_{k-1}``,
    ``B = b`` and ``C = c^T A``; the Gramians solve ``P = A P A^H + B B^H`` and
    ``Q = A^H Q A + C^H C``; the values are taken in square-root form,
    ``svd(chol(Q)^H chol(P))``, since ``sqrt(eig(P Q))`` loses values below ``sqrt(eps)``.
    """
    A = np.diag(a)
    B = b[:, None]
    C = c[None, :] @ A
    P = solve_discrete_lyapunov(A, B @ B.conj().T)
    Q = solve_discrete_lyapunov(A.conj().T, C.conj().T @ C)
    return svdvals(cholesky(Q, lower=True).conj().T @ cholesky(P, lower=True))


@pytest.mark.parametrize("method", ["gramian", "dense"])
def test_lti_limit_real(method):
    rng = np.random.default_rng(0)
    n, length = 5, 400
    a = rng.uniform(0.3, 0.9, n)
    b, c = rng.standard_normal(n), rng.standard_normal(n)
    expected = _hankel_singular_values(a, b, c)
    ones = torch.ones(1, length, 1, dtype=torch.float64)
    op = DiagonalRealization(torch.from_numpy(c) * ones, torch.from_numpy(b) * ones,
                             torch.from_numpy(np.log(a)) * ones)
    got = split_singular_values(op, splits=[length // 2], method=method)[0, 0].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12 * expected[0])


def test_lti_limit_complex_s4d_style():
    """``T = Re(sum ...)`` of N complex modes has the Hankel values of the 2N-dim real system."""
    rng = np.random.default_rng(1)
    n, length = 3, 300
    a = rng.uniform(0.5, 0.85, n) * np.exp(1j * rng.uniform(0.2, 2.0, n))
    b = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    c = rng.standard_normal(n) + 1j * rng.standard_normal(n)
    half = 1 / np.sqrt(2)
    expected = _hankel_singular_values(
        np.concatenate([a, a.conj()]), np.concatenate([b, b.conj()]) * half,
        np.concatenate([c, c.conj()]) * half,
    )
    ones = torch.ones(1, length, 1, dtype=torch.complex128)
    op = DiagonalRealization(torch.from_numpy(c) * ones, torch.from_numpy(b) * ones,
                             torch.from_numpy(np.log(a)) * ones)
    got = split_singular_values(op, splits=[length // 2])[0, 0].numpy()
    assert got.shape == (2 * n,)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-12 * expected[0])
