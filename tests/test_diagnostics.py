"""diagnose and ess_around_tokens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ess_reg import DiagonalRealization, ESSMetric, diagnose
from ess_reg.analysis import ess_around_tokens
from ess_reg.models import SequenceModel


def _collapsed(length=128, n=16):
    g = torch.Generator().manual_seed(0)
    c, b = torch.randn(2, length, 1, generator=g), torch.randn(2, length, 1, generator=g)
    return DiagonalRealization(c.expand(2, length, n).contiguous(), b.expand(2, length, n).contiguous())


def _saturated(length=256, n=4):
    features = torch.eye(n)[torch.arange(length) % n].expand(2, length, n).contiguous()
    return DiagonalRealization(features, features)


def test_the_two_failure_modes_are_detected():
    result = diagnose({"collapsed": _collapsed(), "saturated": _saturated(),
                       "healthy": DiagonalRealization(torch.randn(2, 64, 8), torch.randn(2, 64, 8))})
    assert result.collapsed == ["collapsed"] and result.saturated == ["saturated"]
    assert result["healthy"].status == "healthy"
    assert result["collapsed"].utilization < 0.1 and result["saturated"].utilization > 0.9
    table = str(result)
    assert "collapsed" in table and "saturated" in table and "utilization" in table


def test_attention_at_its_edge_bound_is_full_rank_not_saturated():
    from ess_reg import DenseOperator

    g = torch.Generator().manual_seed(0)
    attention = DenseOperator(torch.randn(1, 2, 16, 16, generator=g).tril())  # generic: full rank
    result = diagnose({"attn": attention, "ssm": _saturated()})
    assert result["attn"].status == "full rank" and result["attn"].tss is None
    assert result.saturated == ["ssm"]
    metric = ESSMetric()
    metric.update({"attn": attention})
    assert diagnose(metric.compute())["attn"].status == "full rank"


def test_diagnose_from_a_metric_result_and_thresholds():
    metric = ESSMetric()
    metric.update({"a": _collapsed(), "b": _saturated()})
    result = diagnose(metric.compute(), saturated_at=0.95, collapsed_below=0.2)
    assert result["a"].status == "collapsed" and result["a"].tss == 16
    assert diagnose(_saturated()).layers[0].layer == "operator"
    with pytest.raises(ValueError, match="collapsed_below < saturated_at"):
        diagnose(metric.compute(), saturated_at=0.1, collapsed_below=0.5)
    with pytest.raises(ValueError, match="utilization"):
        diagnose({"x/ess": torch.tensor(1.0)})


def test_ess_around_tokens_aligns_on_delimiters():
    torch.manual_seed(0)
    model = SequenceModel(["sa", "gla"], d_model=32, n_layers=2, vocab_size=20)
    ids = torch.randint(1, 20, (3, 40))
    ids[:, [10, 25]] = 0
    result = ess_around_tokens(model, ids, token_id=0, window=5)
    assert result.occurrences == 6
    assert list(result.offsets) == list(range(-5, 5))
    assert set(result.curves) == {"blocks.0.mixer", "blocks.1.mixer"}
    assert all(np.isfinite(c).all() for c in result.curves.values())
    assert all(np.isfinite(v) for v in result.modulation.values())
    with pytest.raises(ValueError, match="does not occur"):
        ess_around_tokens(model, ids, token_id=99)


def test_a_resetting_operator_has_full_modulation():
    """A layer whose state is wiped at the delimiter: ESS drops right after it."""
    length, n = 40, 4
    ids = torch.ones(1, length, dtype=torch.long)
    ids[0, 20] = 7
    log_decay = torch.zeros(1, 1, length, 1)
    log_decay[..., 20, :] = -60.0  # forget everything at the delimiter
    g = torch.Generator().manual_seed(1)
    op = DiagonalRealization(torch.randn(1, 1, length, n, generator=g),
                             torch.randn(1, 1, length, n, generator=g), log_decay)
    result = ess_around_tokens({"reset": op}, ids, token_id=7, window=4, kind="tolerance",
                               tol=1e-8, relative=False)
    curve = result.curves["reset"]
    assert curve[result.offsets == 0][0] < 0.1  # nothing before the delimiter reaches past it
    assert curve[result.offsets == 1][0] == 1  # only the delimiter's own input
    assert result.modulation["reset"] == pytest.approx(1 - 1.5 / 2.5)  # before: 4,3,2,1; after: 0,1,2,3
