"""Reference mixers: exact traces, shapes, state sizes and transitions."""

from __future__ import annotations

import pytest
import torch

from ess_reg import DenseOperator, DiagonalRealization, ess_curve
from ess_reg.mixers import FEATURE_MAPS, MIXERS, LinearAttention

LENGTH = 70  # longer than one chunk of the scans


def _trace_error(mixer, x):
    trace = mixer.trace(x)
    dense = trace.operator.dense()
    predicted = dense @ trace.u.to(dense.dtype)
    assert trace.u.shape == trace.y.shape and trace.u.dim() == 4
    assert trace.operator.shape == trace.u.shape[:2]
    return (predicted - trace.y).abs().max() / trace.y.abs().max().clamp_min(1e-30)


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize(("dtype", "tol"), [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_operator_reproduces_inner_output(name, dtype, tol):
    torch.manual_seed(0)
    mixer = MIXERS[name](d_model=32).to(dtype)
    x = torch.randn(2, LENGTH, 32, dtype=dtype)
    assert _trace_error(mixer, x) < tol


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_defaults_forward_and_metadata(name):
    mixer = MIXERS[name](d_model=64)
    x = torch.randn(3, 17, 64)
    assert mixer(x).shape == x.shape
    trace = mixer.trace(x)
    if mixer.state_size is None:
        assert isinstance(trace.operator, DenseOperator)
    else:
        assert isinstance(trace.operator, DiagonalRealization)
        assert trace.operator.state_size == mixer.state_size
    if mixer.has_transition:
        transition = mixer.transition(x)
        assert transition.shape[:3] == trace.u.shape[:3]
        assert ((transition > 0) & (transition <= 1)).all()
    else:
        with pytest.raises(NotImplementedError):
            mixer.transition(x)


@pytest.mark.parametrize("feature_map", sorted(FEATURE_MAPS))
def test_linear_attention_feature_maps(feature_map):
    torch.manual_seed(1)
    mixer = LinearAttention(32, feature_map=feature_map, feature_dim=4).double()
    x = torch.randn(2, 40, 32, dtype=torch.float64)
    assert _trace_error(mixer, x) < 1e-10
    op = mixer.trace(x).operator
    assert op.state_size == mixer.feature_map.out_dim
    rank = ess_curve(op, "tolerance", tol=1e-9)
    assert (rank <= op.state_size).all()


def test_normalized_linear_attention_is_a_row_scaling():
    torch.manual_seed(2)
    plain = LinearAttention(32, feature_map="elu", normalize=False).double()
    normed = LinearAttention(32, feature_map="elu", normalize=True).double()
    normed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 30, 32, dtype=torch.float64)
    assert _trace_error(normed, x) < 1e-10
    ranks = [ess_curve(m.trace(x).operator, "tolerance", tol=1e-9) for m in (plain, normed)]
    torch.testing.assert_close(ranks[0], ranks[1])


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="feature_map must be one of"):
        LinearAttention(32, feature_map="cosine")
    with pytest.raises(ValueError, match="not positive, but the layer has normalize=True"):
        LinearAttention(32, feature_map="identity", normalize=True)
    with pytest.raises(ValueError, match="divisible"):
        MIXERS["sa"](d_model=30, num_heads=4)
    with pytest.raises(ValueError, match=r"expects x of shape \[B, L, 32\]"):
        MIXERS["gla"](d_model=32)(torch.randn(2, 5, 16))


def test_captured_operator_carries_gradients_to_parameters():
    torch.manual_seed(3)
    mixer = MIXERS["gla"](d_model=32)
    mixer.request_capture()
    mixer(torch.randn(2, 20, 32))
    ess_curve(mixer.captured_operator, splits=4).mean().backward()
    assert mixer.q.weight.grad is not None and torch.isfinite(mixer.q.weight.grad).all()
    assert mixer.gate[1].bias.grad.abs().sum() > 0
