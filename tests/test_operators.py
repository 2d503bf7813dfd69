"""Operators: materialization, metadata, device/dtype moves."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_causal, random_realization, reference_matrix

from ess_reg import DenseOperator, DiagonalRealization
from ess_reg.operators import as_operator


@pytest.mark.parametrize("decay", ["diagonal", "scalar", None])
@pytest.mark.parametrize("complex_", [False, True])
def test_realization_dense_matches_entrywise_reference(decay, complex_):
    c, b, ld = random_realization(2, 9, 3, decay=decay, complex_=complex_, seed=3)
    op = DiagonalRealization(c, b, ld)
    expected = reference_matrix(c, b, ld)
    np.testing.assert_allclose(op.dense().numpy(), expected, rtol=1e-12, atol=1e-12)
    assert op.dense().dtype == torch.float64


def test_realization_dense_equals_recurrence():
    """``T u`` equals running ``h_i = diag(exp(ld_i)) h_{i-1} + b_i u_i``, ``y_i = c_i . h_i``."""
    c, b, ld = random_realization(1, 15, 4, seed=1)
    u = torch.randn(15, dtype=torch.float64)
    h = torch.zeros(4, dtype=torch.float64)
    ys = []
    for i in range(15):
        h = torch.exp(ld[0, i]) * h + b[0, i] * u[i]
        ys.append((c[0, i] * h).sum())
    y = torch.stack(ys)
    torch.testing.assert_close(DiagonalRealization(c, b, ld).dense()[0] @ u, y)


def test_dense_never_overflows_with_strong_decay():
    c, b, _ = random_realization(1, 200, 2)
    ld = torch.full((1, 200, 2), -50.0, dtype=torch.float64)
    matrix = DiagonalRealization(c, b, ld).dense()
    assert torch.isfinite(matrix).all()
    assert (matrix.triu(1) == 0).all()


def test_metadata_and_state_size():
    c, b, ld = random_realization(3, 10, 4, batch=2)
    op = DiagonalRealization(c, b, ld)
    assert op.shape == (2, 3) and op.batch_shape == (2,) and op.num_channels == 3
    assert op.seq_len == 10 and op.state_size == 4
    cc, bc, ldc = random_realization(3, 10, 4, complex_=True)
    assert DiagonalRealization(cc, bc, ldc).state_size == 8
    assert DiagonalRealization(cc, bc, ldc).dtype == torch.float64
    dense = DenseOperator(random_causal(3, 10))
    assert dense.state_size is None and dense.seq_len == 10 and dense.shape == (3,)
    assert "DenseOperator" in repr(dense)


def test_to_moves_and_casts():
    c, b, ld = random_realization(2, 8, 3, complex_=True)
    op = DiagonalRealization(c, b, ld).to(torch.float32)
    assert op.c.dtype == torch.complex64 and op.dtype == torch.float32
    dense = DenseOperator(random_causal(2, 8)).to(dtype=torch.float32)
    assert dense.matrix.dtype == torch.float32
    assert isinstance(dense.to("cpu"), DenseOperator)


def test_dense_operator_zeroes_rounding_noise_above_diagonal():
    matrix = random_causal(1, 6) + 1e-12 * torch.ones(1, 6, 6, dtype=torch.float64).triu(1)
    assert (DenseOperator(matrix).dense().triu(1) == 0).all()


def test_as_operator_wraps_tensors():
    assert isinstance(as_operator(random_causal(1, 5)), DenseOperator)
    with pytest.raises(TypeError, match="operator must be"):
        as_operator([[1.0]])


def test_low_precision_factors_materialize():
    c, b, ld = random_realization(2, 8, 3)
    op = DiagonalRealization(c.half(), b.half(), ld.half())
    dense = op.dense()
    assert dense.dtype == torch.float16
    torch.testing.assert_close(dense.double(), DiagonalRealization(
        c.half().double(), b.half().double(), ld.half().double()).dense(), atol=1e-2, rtol=1e-2)


def test_input_independent_decay_is_shared_across_the_batch():
    c, b, ld = random_realization(3, 8, 2, batch=2)
    shared = DiagonalRealization(c, b, ld[0])
    assert shared.log_decay.shape == c.shape
    torch.testing.assert_close(shared.dense()[1], DiagonalRealization(c[1], b[1], ld[0]).dense())


def _entrywise(c, b, ld):
    """``Re sum_n c[i,n] b[j,n] exp(G_i - G_j)`` on ``[..., L, L, N]``, the future masked before exp."""
    cum = torch.cumsum(ld, dim=-2)
    length = c.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()[..., None]
    diff = torch.where(causal, cum[..., :, None, :] - cum[..., None, :, :], 0)
    term = (c[..., :, None, :] * b[..., None, :, :] * torch.where(causal, torch.exp(diff), 0)).sum(-1)
    return term.real if term.is_complex() else term


@pytest.mark.parametrize("length", [1, 2, 3, 7, 16, 26, 50])
@pytest.mark.parametrize("complex_", [False, True])
def test_blocked_materialization_matches_the_entrywise_sum_in_value_and_gradient(length, complex_):
    """The per-mode decay is built in column blocks that factor the decay through each block's last
    column; values and gradients equal the entry-wise sum, resets and floor decays included."""
    from ess_reg.operators.diagonal import materialize

    generator = torch.Generator().manual_seed(length)
    dtype = torch.complex128 if complex_ else torch.float64
    shape = (2, 3, length, 4)
    c = torch.randn(shape, dtype=dtype, generator=generator).requires_grad_()
    b = torch.randn(shape, dtype=dtype, generator=generator).requires_grad_()
    real = -torch.rand(shape, dtype=torch.float64, generator=generator)
    resets = torch.rand(shape, generator=generator) < 0.15
    real = torch.where(resets, torch.tensor(-1e3, dtype=torch.float64), real)
    real[..., -1:, 0] = -1500.0
    rotation = torch.randn(shape, dtype=torch.float64, generator=generator)
    ld = torch.complex(real, rotation) if complex_ else real
    ld.requires_grad_()
    got, expected = materialize(c, b, ld), _entrywise(c, b, ld)
    torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)
    if length == 50:  # both kinds of diagonal block: one product, and masked entry by entry (resets)
        from ess_reg.operators.diagonal import _smooth_blocks

        smooth = _smooth_blocks(torch.cumsum(ld.detach(), dim=-2), 7)
        assert any(smooth) and not all(smooth)
    weights = torch.randn(got.shape, dtype=torch.float64, generator=generator)
    for mine, theirs in zip(torch.autograd.grad(got, (c, b, ld), weights),
                            torch.autograd.grad(expected, (c, b, ld), weights), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)
    shared = torch.randn(3, length, 4, dtype=torch.float64, generator=generator).abs().neg()
    torch.testing.assert_close(materialize(c.detach().real, b.detach().real, shared),
                               _entrywise(c.detach().real, b.detach().real, shared), rtol=1e-13, atol=1e-13)
