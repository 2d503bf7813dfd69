"""The ``ess-reg`` console script."""

from __future__ import annotations

import pytest

from ess_reg.cli import main
from ess_reg.showcase import run_showcase


def test_showcase_prints_a_table(capsys):
    assert main(["showcase", "--seq-len", "24", "--state", "4", "--channels", "2"]) == 0
    out = capsys.readouterr().out
    for name in ("linear attention", "gated linear attention", "S4D", "softmax attention"):
        assert name in out
    assert "utilization" in out


def test_showcase_rows_respect_bounds():
    for row in run_showcase(seq_len=20, state=4, channels=2, splits=5):
        assert 0 <= row.utilization <= 1 + 1e-9
        assert row.tss is None or row.entropy_ess <= row.tss + 1e-9


@pytest.mark.parametrize("argv", [["showcase", "--seq-len", "0"], ["showcase", "--bogus"], ["nope"], []])
def test_bad_arguments_exit_2_without_traceback(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_invalid_values_exit_2(capsys):
    assert main(["showcase", "--seq-len", "1"]) == 2
    assert "at least 2" in capsys.readouterr().err


def test_splits_all_means_every_split(capsys):
    assert main(["showcase", "--seq-len", "12", "--state", "2", "--channels", "1", "--splits", "all"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["showcase", "--splits", "some"])
    assert exc.value.code == 2 and "'all'" in capsys.readouterr().err
