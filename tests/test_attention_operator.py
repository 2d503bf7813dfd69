"""``SoftmaxAttentionOperator``: causal softmax attention formed from q and k on demand."""

from __future__ import annotations

import math

import pytest
import torch

from ess_reg import DenseOperator, ESSRegularizer, ess_curve
from ess_reg.models import SequenceModel
from ess_reg.operators import SoftmaxAttentionOperator
from ess_reg.regularizer.sampling import sample_operators


def _qk(*shape):
    g = torch.Generator().manual_seed(0)
    return torch.randn(*shape, generator=g), torch.randn(*shape, generator=g)


def test_matrix_is_causal_softmax_attention_and_routes_agree_with_the_dense_operator():
    q, k = _qk(2, 3, 12, 4)
    op = SoftmaxAttentionOperator(q, k)
    scores = q @ k.mT / math.sqrt(4)
    reference = torch.softmax(scores.masked_fill(torch.ones(12, 12).triu(1).bool(), -torch.inf), -1)
    assert torch.equal(op.matrix, reference) and op.matrix.triu(1).abs().max() == 0
    assert (tuple(op.shape), op.seq_len, op.state_size, op.dtype) == ((2, 3), 12, None, torch.float32)
    torch.testing.assert_close(ess_curve(op), ess_curve(DenseOperator(reference)), rtol=0, atol=0)
    assert op.dense(torch.float64).dtype == torch.float64


def test_rebuild_to_and_sampling_keep_the_operator_lazy():
    q, k = _qk(4, 2, 10, 3)
    op = SoftmaxAttentionOperator(q, k)
    assert isinstance(op.rebuild([q * 2, k]), SoftmaxAttentionOperator)
    assert op.to(torch.float64).dtype == torch.float64
    sub, (batch_index, batch) = sample_operators(op, 3, torch.Generator().manual_seed(1))
    assert isinstance(sub, SoftmaxAttentionOperator) and tuple(sub.shape) == (3,) and batch == 4
    rows = torch.randperm(8, generator=torch.Generator().manual_seed(1))[:3].sort().values
    torch.testing.assert_close(sub.matrix, op.matrix.reshape(8, 10, 10)[rows], rtol=0, atol=0)
    assert torch.equal(batch_index, rows // 2)


def test_gradients_reach_queries_and_keys():
    q, k = (t.requires_grad_(True) for t in _qk(1, 2, 9, 3))
    ess_curve(SoftmaxAttentionOperator(q, k)).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="same shape"):
        SoftmaxAttentionOperator(torch.zeros(2, 5, 3), torch.zeros(2, 5, 4))
    with pytest.raises(ValueError, match="same shape"):
        SoftmaxAttentionOperator(torch.zeros(5, 3), torch.zeros(5, 3))


def test_the_attention_mixer_hands_it_to_the_regularizer_in_both_modes():
    ids = torch.randint(0, 30, (4, 16), generator=torch.Generator().manual_seed(2))
    grads = {}
    for mode in ("loss_term", "attached"):
        torch.manual_seed(0)
        model = SequenceModel("sa", d_model=16, n_layers=1, vocab_size=30).double()
        reg = ESSRegularizer(model, splits=[3, 7, 11], max_operators=3)
        if mode == "attached":
            reg.attach()
        loss = model(ids).sum() * 0
        if mode == "loss_term":
            assert isinstance(reg._pending["blocks.0.mixer"][0][0], SoftmaxAttentionOperator)
            loss = loss + reg()
        loss.backward()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    assert any(g.abs().sum() > 0 for g in grads["loss_term"])
    for a, b in zip(grads["loss_term"], grads["attached"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_half_precision_scores_do_not_overflow_and_bad_inputs_are_named():
    q = torch.full((1, 1, 6, 4), 130.0, dtype=torch.float16)
    op = SoftmaxAttentionOperator(q, q.clone())
    assert op.dtype == torch.float32 and torch.isfinite(op.matrix).all()
    assert torch.isfinite(ess_curve(op)).all()
    with pytest.raises(TypeError, match="one dtype"):
        SoftmaxAttentionOperator(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="real floating point"):
        z = torch.zeros(1, 4, 3, dtype=torch.complex64)
        SoftmaxAttentionOperator(z, z)
    with pytest.raises(ValueError, match="d >= 1"):
        SoftmaxAttentionOperator(torch.zeros(1, 4, 0), torch.zeros(1, 4, 0))
