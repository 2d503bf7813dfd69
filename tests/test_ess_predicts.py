"""The ESS-vs-TSS study's statistics (benchmarks/ess_predicts.py) against scipy."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

stats = pytest.importorskip("scipy.stats")

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "ess_predicts.py"
_spec = importlib.util.spec_from_file_location("ess_predicts", _PATH)
ess_predicts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(ess_predicts)

_values = st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.5, 7.0]), min_size=3, max_size=12)


@settings(max_examples=60, deadline=None)
@given(_values, st.data())
def test_rank_correlations_match_scipy_with_ties(x, data):
    y = data.draw(st.lists(st.floats(0, 1, allow_nan=False), min_size=len(x), max_size=len(x)))
    x, y = np.array(x), np.array(y)
    rho, tau = ess_predicts.spearman(x, y), ess_predicts.kendall(x, y)
    constant = len(set(x)) == 1 or len(set(y)) == 1
    if constant:
        assert math.isnan(rho) and math.isnan(tau)
        return
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert tau == pytest.approx(stats.kendalltau(x, y, variant="b").statistic, abs=1e-12)


def test_correlations_are_batched_over_resamples():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(5, 9)), rng.normal(size=(5, 9))
    rho, tau = ess_predicts.spearman(x, y), ess_predicts.kendall(x, y)
    for i in range(5):
        assert rho[i] == pytest.approx(stats.spearmanr(x[i], y[i]).statistic)
        assert tau[i] == pytest.approx(stats.kendalltau(x[i], y[i]).statistic)


def _record(key, mixer, accuracy, ess_total, layers, kv=4, task="mqar", seq_len=64):
    metric = {"ess/total": ess_total}
    for name, size in layers.items():
        metric[f"{name}/total_ess"] = ess_total / len(layers)
        metric[f"{name}/ess"] = ess_total / len(layers) / size["channels"]
    return {"key": key, "setting": "s", "cell": key, "seed": 0, "test_accuracy": accuracy, "metric": metric,
            "layers": layers, "config": {"mixer": mixer, "kv_pairs": kv, "copy_tokens": 3, "task": task,
                                         "seq_len": seq_len}}


def test_model_rows_follow_the_stated_conventions():
    gla = {"a": {"channels": 2, "tss": 8, "needed": 3, "value_width": 16},
           "b": {"channels": 2, "tss": 8, "needed": 5, "value_width": 16}}
    sa = {"a": {"channels": 4, "tss": None, "needed": 20}}
    rows = ess_predicts.model_rows([_record("g", "gla", 0.5, 12.0, gla),
                                    _record("s", "sa", 0.9, 40.0, sa, task="selective_copying")])
    g, s = rows
    assert g["ess_per_kv"] == 3.0 and g["tss_per_kv"] == (2 * 8 + 2 * 8) / 4
    assert g["channel_ess_per_kv"] == pytest.approx((3.0 + 3.0) / 4) and g["channel_tss_per_kv"] == 16 / 4
    assert g["float_ess_per_kv"] == 12.0 * 16 / 4 and g["float_tss_per_kv"] == 2 * 2 * 8 * 16 / 4
    assert s["float_tss_per_kv"] == s["tss_per_kv"]  # no value width recorded: 1
    assert s["items"] == 3 and s["tss_per_kv"] == 4 * 64 / 3  # attention: the sequence length per channel
    with pytest.raises(ValueError, match="older"):
        ess_predicts.model_rows([{**_record("o", "gla", 0.1, 1.0, gla), "layers": None}])


def test_report_and_figure_from_a_results_file(tmp_path):
    rng = np.random.default_rng(1)
    lines = []
    for i in range(12):
        mixer = ["gla", "la", "s6"][i % 3]
        size = {"a": {"channels": 2, "tss": 4 * (1 + i % 4), "needed": 2}}
        ess = float(rng.uniform(1, 20))
        lines.append(json.dumps(_record(f"m{i}", mixer, min(1.0, ess / 20), ess, size)))
    path = tmp_path / "results.jsonl"
    path.write_text("\n".join(lines) + '\n{"key": "cut')  # a line a killed writer cut off
    rows = ess_predicts.model_rows(ess_predicts.load_records([path]))
    assert len(rows) == 12
    text = ess_predicts.report(rows)
    assert "| all models | 12 | +1.00 [+1.00, +1.00]" in text  # accuracy is monotone in ESS/kv here
    assert "| gla | 4 |" in text and "per channel" in text
    figure = tmp_path / "figure.png"
    assert ess_predicts.main([str(path), "--figure", str(figure)]) == 0 and figure.stat().st_size > 0


_distill_spec = importlib.util.spec_from_file_location("distill_study", _PATH.with_name("distill_study.py"))
distill_study = importlib.util.module_from_spec(_distill_spec)
_distill_spec.loader.exec_module(distill_study)


def _run(key, accuracy, ess, tss, needed, kv=8, teacher=None, kl=None):
    layers = {"blocks.0.mixer": {"channels": 2, "tss": tss, "needed": needed}}
    record = {"key": key, "setting": key.split("/")[0], "cell": key.split("/")[1], "seed": 0,
              "test_accuracy": accuracy, "config": {"kv_pairs": kv, "teacher": teacher},
              "metric": {"ess/total": ess, "blocks.0.mixer/ess": ess / 2}, "layers": layers}
    return record if kl is None else {**record, "test_distill_kl": kl}


def test_within_group_spearman_is_not_fooled_by_a_shared_trait():
    """Across groups x and y rise together, inside each group they fall: the pooled rho is
    positive, the within-group rho is -1 (Simpson's paradox)."""
    x = [1, 2, 3, 11, 12, 13, 21, 22, 23]
    y = [3, 2, 1, 13, 12, 11, 23, 22, 21]
    groups = [4, 4, 4, 8, 8, 8, 16, 16, 16]
    assert ess_predicts.bootstrap_spearman(x, y)[0] > 0.5
    rho, (_, high) = ess_predicts.stratified_spearman(x, y, groups)
    assert rho == pytest.approx(-1.0) and high == pytest.approx(-1.0)


def test_distillation_report_joins_students_to_their_teachers(tmp_path):
    teachers = [_run(f"kv8/t{i}/seed0", 0.9, ess, 64, needed) for i, (ess, needed) in
                enumerate([(10.0, 6), (20.0, 12), (40.0, 30)])]
    students = [_run("kv8_scratch/student_4/seed0", 0.2, 3.0, 4, 4)]
    for i in range(len(teachers)):
        for n in (4, 8, 16, 32):
            retention = min(1.0, n / (10 * (i + 1)))
            students.append(_run(f"kv8_t{i}/student_{n}/seed0", 0.9 * retention, 3.0, n, n,
                                 teacher=f"runs/sweeps/distill_teachers/kv8/t{i}/seed0", kl=(i + 1) / n))
    for name, records in (("teachers", teachers), ("students", students)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    figure = tmp_path / "distill.png"
    assert distill_study.main(["--teachers", str(tmp_path / "teachers.jsonl"), "--students",
                               str(tmp_path / "students.jsonl"), "--figure", str(figure)]) == 0
    text = distill_study.report(distill_study.teacher_rows(teachers),
                                distill_study.student_rows(students, distill_study.teacher_rows(teachers)))
    assert "| kv8/t2/seed0 | 8 | 0.900 | 40.0 | 20.00 | 64 | 30 |" in text
    assert "| scratch | 0.200 | - | - | - |" in text
    assert "| 4 | 3 | +1.00 | +1.00 | -1.00 | -1.00 |" in text  # more teacher ESS: more KL, less retention
    assert "at or above: 0.93" in text and "below half: 0.20" in text and figure.stat().st_size > 0
    orphan = _run("kv8_x/student_4/seed0", 0.1, 1.0, 4, 4, teacher="runs/sweeps/distill_teachers/kv8/x/seed0")
    with pytest.raises(ValueError, match="run the teachers' grid first"):
        distill_study.student_rows([orphan], distill_study.teacher_rows(teachers))
