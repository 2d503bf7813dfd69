"""The dense route's grouped, mirrored and QR-compressed evaluation against a plain SVD loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import random_causal, reference_singular_values

from ess_reg import ess_curve, split_singular_values
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
    got, _ = dense_route.dense_singular_values(matrix, torch.arange(1, 30), 15)
    for channel in range(2):
        for k, i in enumerate(range(1, 30)):
            sigma = np.linalg.svd(matrix[channel, i:, :i].numpy(), compute_uv=False)
            np.testing.assert_allclose(got[channel, k, :len(sigma)].numpy(), sigma, atol=1e-12)


def test_channel_chunks_under_a_small_memory_budget(monkeypatch):
    monkeypatch.setattr(dense_route, "MEMORY_BUDGET", 500)
    matrix = random_causal(5, 36, seed=6)
    got = split_singular_values(matrix, method="dense")
    _check_against_loop(matrix, got, None)


def test_worker_threads_leave_the_callers_thread_setting_alone():
    before = torch.get_num_threads()
    split_singular_values(random_causal(2, 64, seed=7), method="dense")
    assert torch.get_num_threads() == before



def _max_relative_error(matrix: torch.Tensor, got: torch.Tensor) -> float:
    worst = 0.0
    for channel, spectra in enumerate(reference_singular_values(matrix)):
        for k, sigma in enumerate(spectra):
            values = got[channel, k, :len(sigma)].numpy()
            worst = max(worst, float(np.max(np.abs(values - sigma) / sigma)))
    return worst


class _StackCounter:
    """Counts the channels that went through the exact stack SVD instead of Gram eigenvalues."""

    def __init__(self, monkeypatch):
        self.channels = 0
        original = dense_route._stack_values

        def counting(tops, triangular, splits):
            self.channels += tops.shape[0]
            return original(tops, triangular, splits)

        monkeypatch.setattr(dense_route, "_stack_values", counting)


def _softmax_attention(channels: int, length: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(channels, length, 16, generator=g, dtype=torch.float64) for _ in range(2))
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (q @ k.mT / 4).masked_fill(~causal, float("-inf")).softmax(-1)


@pytest.mark.parametrize("operator", ["random", "softmax"])
def test_well_conditioned_blocks_take_gram_eigenvalues_to_full_relative_accuracy(monkeypatch, operator):
    counter = _StackCounter(monkeypatch)
    matrix = random_causal(3, 96, seed=8) if operator == "random" else _softmax_attention(3, 96, seed=8)
    got = split_singular_values(matrix, method="dense")
    assert counter.channels < 10  # nearly every (group, channel) was certified
    assert _max_relative_error(matrix, got) < 1e-9  # every value, the smallest included


def test_ill_conditioned_blocks_fall_back_to_the_exact_svd(monkeypatch):
    counter = _StackCounter(monkeypatch)
    matrix = random_causal(2, 64, seed=9)
    matrix[0, :, 20] *= 1e-6  # channel 0: every block holding column 20 has condition number ~1e6
    got = split_singular_values(matrix, method="dense")
    assert counter.channels > 0
    # Gram eigenvalues would be ~1e-4 off relative here (eps * 1e12); the SVD is not
    assert _max_relative_error(matrix, got) < 1e-9


@pytest.mark.parametrize("scale", [1e-250, 1e250, "largest"])
def test_extreme_scales_neither_underflow_nor_overflow(scale):
    matrix = random_causal(2, 40, seed=10)
    if scale == "largest":  # as large as entries go with every singular value still finite
        scale = torch.finfo(torch.float64).max / (matrix.shape[-1] * float(matrix.abs().max()))
    plain = split_singular_values(matrix, method="dense")
    scaled = split_singular_values(matrix * scale, method="dense")
    np.testing.assert_allclose((scaled / scale).numpy(), plain.numpy(), rtol=1e-12, atol=0)


def test_rank_deficient_and_zero_channels_next_to_full_rank_ones():
    g = torch.Generator().manual_seed(11)
    feats = torch.randn(36, 2, generator=g, dtype=torch.float64)
    matrix = random_causal(3, 36, seed=11)
    matrix[1] = (feats @ feats.T).tril()
    matrix[2] = 0
    got = split_singular_values(matrix, method="dense")
    _check_against_loop(matrix, got, None)
    assert (got[1, :, 2:] <= 1e-12 * got[1, :, :1]).all() and (got[2] == 0).all()


def test_single_precision_compute_skips_gram_eigenvalues(monkeypatch):
    counter = _StackCounter(monkeypatch)
    matrix = random_causal(1, 32, seed=12)
    got = split_singular_values(matrix, method="dense", dtype=torch.float32)
    assert counter.channels > 0
    reference = split_singular_values(matrix, method="dense")
    np.testing.assert_allclose(got.double().numpy(), reference.numpy(), atol=1e-4 * float(reference.max()))


# -- the backward: Gram route where certified, SVD elsewhere ----------------------------------------
def _reference_gradient(matrix: torch.Tensor, splits: list[int], weights: torch.Tensor) -> torch.Tensor:
    """d/dT of sum_i <weights_i, sigma(T[i:, :i])>, by autograd through one svdvals per block (float64)."""
    leaf = matrix.detach().clone().requires_grad_()
    total = 0
    for k, split in enumerate(splits):
        sigma = torch.linalg.svdvals(leaf[:, split:, :split])
        total = total + (sigma * weights[:, k, : sigma.shape[-1]]).sum()
    total.backward()
    return leaf.grad


def _dense_gradient(matrix: torch.Tensor, splits: list[int], weights: torch.Tensor, **kwargs) -> torch.Tensor:
    leaf = matrix.detach().clone().requires_grad_()
    values, log_scale = dense_route.dense_singular_values(leaf, torch.tensor(splits), weights.shape[-1],
                                                          **kwargs)
    (values * torch.exp(log_scale)[..., None] * weights).sum().backward()
    return leaf.grad


class _SvdGradientCounter:
    def __init__(self, monkeypatch):
        self.blocks = 0
        real = dense_route._svd_gradient

        def counting(blocks, weight):
            self.blocks += blocks.shape[0] * blocks.shape[1]
            return real(blocks, weight)

        monkeypatch.setattr(dense_route, "_svd_gradient", counting)


@pytest.mark.parametrize("operator", ["random", "softmax"])
def test_backward_takes_the_gram_route_on_well_conditioned_blocks_and_matches_autograd(monkeypatch, operator):
    counter = _SvdGradientCounter(monkeypatch)
    length = 48
    matrix = (random_causal(3, length, seed=21) if operator == "random"
              else _softmax_attention(3, length, seed=21))
    splits = list(range(1, length))  # tall blocks before the middle, wide ones after it
    weights = torch.rand(3, len(splits), length // 2, generator=torch.Generator().manual_seed(0),
                         dtype=torch.float64)
    got = _dense_gradient(matrix, splits, weights)
    expected = _reference_gradient(matrix, splits, weights)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert counter.blocks < len(splits)  # nearly every block was certified


def test_backward_falls_back_to_the_svd_on_ill_conditioned_blocks(monkeypatch):
    counter = _SvdGradientCounter(monkeypatch)
    matrix = random_causal(2, 40, seed=22)
    matrix[0, :, 10] *= 1e-6  # channel 0: every block holding column 10 has condition number ~1e6
    splits = [5, 12, 20, 27, 33]
    weights = torch.rand(2, len(splits), 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    got = _dense_gradient(matrix, splits, weights)
    expected = _reference_gradient(matrix, splits, weights)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
    assert counter.blocks > 0


@pytest.mark.parametrize("complex_", [False, True])
def test_ill_conditioned_blocks_take_the_gram_route_when_small_values_carry_no_gradient(
        monkeypatch, complex_):
    """ESS gradients stop below 1e-4 of each block's largest value: such blocks take the Gram route
    whatever their condition number, and agree with autograd through svdvals to about 1e-8."""
    counter = _SvdGradientCounter(monkeypatch)
    length = 40
    matrix = _softmax_attention(3, length, seed=24)
    if complex_:
        matrix = torch.complex(matrix, 0.3 * _softmax_attention(3, length, seed=25))
    matrix[0, :, 7] *= 1e-7  # ill-conditioned blocks: a value near 1e-7 of the largest
    splits = [3, 9, 17, 20, 26, 33]
    rank = length // 2
    values = torch.stack([torch.nn.functional.pad(torch.linalg.svdvals(matrix[:, i:, :i]),
                                                  (0, rank - min(i, length - i)))
                          for i in splits], dim=1)  # [3, S, rank]
    weights = torch.rand(values.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    weights = torch.where(values > 1e-4 * values[..., :1], weights, 0)  # what limit_gradient leaves
    got = _dense_gradient(matrix, splits, weights)
    expected = _reference_gradient(matrix, splits, weights)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-7 * float(expected.abs().max()))
    assert counter.blocks == 0
    assert bool((values[0] < 1e-6 * values[0, :, :1]).logical_and(values[0] > 0).any())  # ill-conditioned


@pytest.mark.parametrize("gap", [1e-3, 1e-9])
def test_values_straddling_the_gradient_cutoff_closely_keep_the_svd_backward(monkeypatch, gap):
    """Two values 1e-4 (1 +- gap) of the largest: only the upper one carries an ESS gradient, and
    the Gram matrix would mix their vectors (error about eps / (4e-8 gap)); the SVD stays exact."""
    counter = _SvdGradientCounter(monkeypatch)
    length, split = 16, 8
    g = torch.Generator().manual_seed(1)
    left = torch.linalg.qr(torch.randn(length - split, length - split, generator=g, dtype=torch.float64))[0]
    right = torch.linalg.qr(torch.randn(split, split, generator=g, dtype=torch.float64))[0]
    sigma = torch.tensor([1.0, 0.6, 0.3, 0.1, 1e-4 * (1 + gap), 1e-4 * (1 - gap), 3e-5, 1e-6],
                         dtype=torch.float64)
    matrix = torch.zeros(1, length, length, dtype=torch.float64)
    matrix[0, split:, :split] = left[:, :split] @ torch.diag(sigma) @ right.T
    leaf = matrix.clone().requires_grad_()
    ess_curve(leaf, method="dense", splits=[split]).sum().backward()
    reference = matrix.clone().requires_grad_()
    values = torch.linalg.svdvals(reference[0, split:, :split])
    values = torch.where(values.detach() > 1e-4 * values[0].detach(), values, values.detach())
    p = values / values.sum()
    torch.exp(-(p * torch.log(p)).sum()).backward()
    scale = float(reference.grad.abs().max())
    torch.testing.assert_close(leaf.grad, reference.grad, rtol=1e-9, atol=1e-9 * scale)
    assert counter.blocks == 1


def test_complex_and_repeated_splits_in_the_gram_backward():
    g = torch.Generator().manual_seed(23)
    matrix = torch.complex(torch.randn(2, 24, 24, generator=g, dtype=torch.float64),
                           torch.randn(2, 24, 24, generator=g, dtype=torch.float64)).tril()
    splits = [3, 12, 12, 20, 3]
    weights = torch.rand(2, len(splits), 12, generator=g, dtype=torch.float64)
    got = _dense_gradient(matrix, splits, weights)
    expected = _reference_gradient(matrix, splits, weights)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9 * float(expected.abs().max()))
