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


def test_needed_state_column_and_verdicts():
    import torch

    from ess_reg import state_size_needed
    from ess_reg.analysis import LayerReport, format_reports, layer_report
    from ess_reg.models import SequenceModel

    torch.manual_seed(0)
    model = SequenceModel(["gla", "s6"], d_model=32, n_layers=2, vocab_size=64)
    ids = torch.randint(0, 64, (4, 32))
    reports = layer_report(model, ids)
    assert {r.name: r.needed_state for r in reports} == state_size_needed(model, ids)
    text = format_reports(reports)
    assert "needed state" in text and "blocks.1.mixer:" in text
    base = dict(name="x", mixer="s6", channels=1, entropy_ess=1.0, tolerance_ess=1.0, total_ess=1.0,
                utilization=0.1, ess_per_kv=None, splits=None, curve=None)
    assert LayerReport(tss=64, needed_state=12, **base).state_verdict == "could shrink from 64 to ~12"
    assert LayerReport(tss=16, needed_state=16, **base).state_verdict.startswith("full: needs all 16")
    assert LayerReport(tss=None, needed_state=None, **base).state_verdict.startswith("no finite state")
    verdicts = {u: LayerReport(tss=8, needed_state=4, **{**base, "utilization": u}).verdict
                for u in (0.05, 0.5, 0.95)}
    assert verdicts == {0.05: "collapsed", 0.5: "healthy", 0.95: "saturated"}  # as diagnose()
    collapsed = LayerReport(tss=16, needed_state=2, **{**base, "utilization": 0.05})
    assert "reopen its memory" in format_reports([collapsed]).split("state size per layer:")[1]
    attention = LayerReport(tss=None, needed_state=None, **{**base, "utilization": 0.95})
    assert attention.verdict == "full rank"  # no state to grow
    legend = text.split("\n\n")[1].splitlines()  # one line per column after the first two
    columns = text.splitlines()[0].split()
    assert [line.split()[0] for line in legend][:3] == ["TSS/ch", "needed", "channels"]
    assert "verdict" in columns and len(legend) == 9
