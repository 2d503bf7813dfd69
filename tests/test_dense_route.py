"""The dense route's grouped, mirrored and QR-compressed evaluation against a plain SVD loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_causal, reference_singular_values

from ess_reg import split_singular_values
from ess_reg.functional import dense_route


def _check_against_loop(matrix: torch.Tensor, got: torch.Tensor, splits) -> None:
    for channel, spectra in enumerate(reference_singular_values(matrix.detach(), splits)):
        for k, sigma in enumerate(spectra):
            width = len(sigma)
            np.testing.assert_allclose(got[channel, k, :width].detach().numpy(), sigma,
                                       atol=1e-12 * max(sigma[0], 1e-300), rtol=0)
            assert (got[channel, k, width:] == 0).all()


@pytest.mark.parametrize("length", [70, 71])
def test_all_splits_of_even_and_odd_lengths(length):
    matrix = random_causal(3, length, seed=length)
    got = split_singular_values(matrix, method="dense")
    _check_against_loop(matrix, got, None)


def test_unsorted_repeated_and_sparse_splits():
    matrix = random_causal(2, 64, seed=1)
    splits = [63, 1, 32, 33, 31, 5, 60, 5, 40, 2]
    got = split_singular_values(matrix, splits=splits, method="dense")
    _check_against_loop(matrix, got, splits)


def test_gradient_path_gives_the_same_values():
    matrix = random_causal(2, 40, seed=3)
    plain = split_singular_values(matrix, method="dense")
    leaf = matrix.clone().requires_grad_()
    traced = split_singular_values(leaf, method="dense")
    np.testing.assert_allclose(traced.detach().numpy(), plain.numpy(), atol=1e-12)
    traced.sum().backward()
    assert torch.isfinite(leaf.grad).all()


def test_rank_deficient_blocks_have_exact_zero_spectrum_tail():
    g = torch.Generator().manual_seed(4)
    feats = torch.randn(1, 48, 3, generator=g, dtype=torch.float64)
    matrix = (feats @ feats.mT).tril()  # linear attention: rank <= 3 at every split
    got = split_singular_values(matrix, method="dense")
    top = got[..., :1]
    assert (got[..., 3:] <= 1e-12 * top).all()


def test_complex_operators_match_the_loop():
    g = torch.Generator().manual_seed(5)
    matrix = torch.complex(torch.randn(2, 30, 30, generator=g, dtype=torch.float64),
                           torch.randn(2, 30, 30, generator=g, dtype=torch.float64)).tril()
    got = dense_route.dense_singular_values(matrix, torch.arange(1, 30), 15)
    for channel in range(2):
        for k, i in enumerate(range(1, 30)):
            sigma = np.linalg.svd(matrix[channel, i:, :i].numpy(), compute_uv=False)
            np.testing.assert_allclose(got[channel, k, :len(sigma)].numpy(), sigma, atol=1e-12)


def test_channel_chunks_under_a_small_memory_budget(monkeypatch):
    monkeypatch.setattr(dense_route, "_MEMORY_BUDGET", 500)
    matrix = random_causal(5, 36, seed=6)
    got = split_singular_values(matrix, method="dense")
    _check_against_loop(matrix, got, None)


def test_worker_threads_leave_the_callers_thread_setting_alone():
    before = torch.get_num_threads()
    split_singular_values(random_causal(2, 64, seed=7), method="dense")
    assert torch.get_num_threads() == before

