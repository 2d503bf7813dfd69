"""Shared helpers: an independent float64 numpy reference and random operator builders."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ess", deadline=None, max_examples=25, suppress_health_check=[HealthCheck.too_slow]
)
settings.load_profile("ess")


def reference_matrix(c, b, log_decay=None) -> np.ndarray:
    """Entry-by-entry float64 build of ``Re sum_n c[i,n] b[j,n] prod_{m=j+1..i} exp(ld[m,n])``.

    Shapes ``[M, L, N]`` (log_decay ``[M, L, N]``, ``[M, L, 1]`` or None); returns ``[M, L, L]``.
    """
    c = np.asarray(c, dtype=np.complex128)
    b = np.asarray(b, dtype=np.complex128)
    m, length, n = c.shape
    ld = np.zeros((m, length, n)) if log_decay is None else np.broadcast_to(
        np.asarray(log_decay, dtype=np.complex128), (m, length, n)
    )
    out = np.zeros((m, length, length))
    for ch in range(m):
        for i in range(length):
            for j in range(i + 1):
                decay = np.exp(ld[ch, j + 1:i + 1].sum(axis=0))
                out[ch, i, j] = np.real(np.sum(c[ch, i] * b[ch, j] * decay))
    return out


def reference_singular_values(matrix: np.ndarray, splits=None) -> list[list[np.ndarray]]:
    """Per channel, per split: ``numpy.linalg.svd(T[i:, :i])`` singular values (float64 loop)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    length = matrix.shape[-1]
    splits = range(1, length) if splits is None else splits
    flat = matrix.reshape(-1, length, length)
    return [[np.linalg.svd(t[i:, :i], compute_uv=False) for i in splits] for t in flat]


def reference_entropy(sigma: np.ndarray) -> float:
    total = sigma.sum()
    if total == 0:
        return 0.0
    p = sigma / total
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def reference_tolerance(sigma: np.ndarray, tol: float = 1e-3, relative: bool = True) -> float:
    if sigma.size == 0:
        return 0.0
    threshold = tol * sigma.max() if relative else tol
    return float((sigma > threshold).sum())


def reference_curve(matrix, kind="entropy", splits=None, tol=1e-3, relative=True) -> np.ndarray:
    """``[M, S]`` reference ESS curve over channels (flattened leading dims)."""
    spectra = reference_singular_values(matrix, splits)
    fn = reference_entropy if kind == "entropy" else (
        lambda s: reference_tolerance(s, tol, relative)
    )
    return np.array([[fn(s) for s in per_channel] for per_channel in spectra])


def random_realization(
    channels=3, length=20, n=4, *, batch=None, decay="diagonal", complex_=False, scale=0.5, seed=0
):
    """Random ``(c, b, log_decay)`` in float64 (complex128 when ``complex_``)."""
    g = torch.Generator().manual_seed(seed)
    lead = (channels,) if batch is None else (batch, channels)
    shape = (*lead, length, n)

    def draw(*s):
        if complex_:
            return torch.complex(torch.randn(*s, generator=g, dtype=torch.float64),
                                 torch.randn(*s, generator=g, dtype=torch.float64))
        return torch.randn(*s, generator=g, dtype=torch.float64)

    c, b = draw(*shape), draw(*shape)
    if decay is None:
        return c, b, None
    width = n if decay == "diagonal" else 1
    real = -scale * torch.rand(*lead, length, width, generator=g, dtype=torch.float64)
    if complex_:
        imag = torch.randn(*lead, length, width, generator=g, dtype=torch.float64)
        return c, b, torch.complex(real, imag)
    return c, b, real


def random_causal(channels=3, length=20, *, batch=None, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    lead = (channels,) if batch is None else (batch, channels)
    return torch.randn(*lead, length, length, generator=g, dtype=torch.float64).tril()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)
