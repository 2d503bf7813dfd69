"""Both evaluations of the diagonal scan against the dense operator, for every decay layout."""

from __future__ import annotations

import pytest
import torch
from conftest import random_realization

from ess_reg import DiagonalRealization
from ess_reg.mixers._kernels import diagonal_scan


@pytest.mark.parametrize("method", ["auto", "chunked", "recurrent"])
@pytest.mark.parametrize(("decay", "complex_"), [("diagonal", False), ("scalar", False), (None, False),
                                                 ("diagonal", True)])
def test_scan_equals_the_dense_operator(method, decay, complex_, monkeypatch):
    from ess_reg.mixers import _kernels

    monkeypatch.setattr(_kernels, "_CHUNK_BUDGET", 2 * 3 * 4 * 8 * 8)  # chunks of 8 over L = 37
    c, b, log_decay = random_realization(3, 37, 4, batch=2, decay=decay, complex_=complex_, seed=9)
    u = torch.randn(2, 3, 37, 5, dtype=torch.float64)
    y = diagonal_scan(c, b, log_decay, u, method=method)
    expected = DiagonalRealization(c, b, log_decay).dense() @ u
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


def test_gradients_agree_between_methods():
    c, b, log_decay = (t.requires_grad_() for t in random_realization(2, 20, 3, seed=1))
    u = torch.randn(1, 2, 20, 2, dtype=torch.float64)
    grads = []
    for method in ("chunked", "recurrent"):
        diagonal_scan(c[None], b[None], log_decay[None], u, method=method).square().sum().backward()
        grads.append([t.grad.clone() for t in (c, b, log_decay)])
        for t in (c, b, log_decay):
            t.grad = None
    for first, second in zip(*grads, strict=True):
        torch.testing.assert_close(first, second, rtol=1e-9, atol=1e-10)


def test_unknown_method_is_rejected():
    c, b, log_decay = random_realization(1, 5, 2, seed=0)
    with pytest.raises(ValueError, match="method"):
        diagonal_scan(c[None], b[None], log_decay[None], torch.zeros(1, 1, 5, 1), method="fast")
