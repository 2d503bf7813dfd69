"""Per-layer reports: which splits a layer is analysed at by default."""

from __future__ import annotations

import torch

from ess_reg.analysis import layer_report
from ess_reg.cli import _note_sampled_splits
from ess_reg.functional.ess import SAMPLED_DENSE_SPLITS
from ess_reg.models import SequenceModel


def _reports(mixer: str, length: int, splits=None):
    torch.manual_seed(0)
    model = SequenceModel(mixer, 16, 1, 32)
    ids = torch.randint(0, 32, (1, length))
    return layer_report(model, ids, splits=splits)


def test_long_attention_layers_default_to_evenly_spaced_splits(capsys):
    (report,) = _reports("sa", 300)
    assert report.sampled_by_default and len(report.splits) == SAMPLED_DENSE_SPLITS
    _note_sampled_splits([report])
    assert "--splits" in capsys.readouterr().out


def test_layers_with_a_small_state_and_short_attention_keep_all_splits():
    (long_state,) = _reports("gla", 300)
    (short_attention,) = _reports("sa", 40)
    assert len(long_state.splits) == 299 and not long_state.sampled_by_default
    assert len(short_attention.splits) == 39 and not short_attention.sampled_by_default


def test_explicit_splits_win():
    (report,) = _reports("sa", 300, splits=5)
    assert len(report.splits) == 5 and not report.sampled_by_default
