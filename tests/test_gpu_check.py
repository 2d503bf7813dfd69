"""benchmarks/gpu_check.py: every part the CPU can reach, at small sizes (the first CUDA machine
runs the rest unchanged)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_it_says_so_in_one_line(gpu_check, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 1 and "no CUDA device" in out


def test_every_check_runs_and_passes_on_the_cpu(gpu_check, capsys):
    assert gpu_check.main(["--quick", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for row in ("gramian route, float64", "dense route, float32", "ESSRegularizer penalty and gradients",
                "no host sync", "Gramian vs dense route", "step cost: gla", "step cost: attention",
                "step cost: gla_wide", "step cost: mamba"):
        assert f"| {row}" in table, row
    assert "FAIL" not in table


def test_a_failed_check_fails_the_command(gpu_check, capsys, monkeypatch):
    real = gpu_check._relative
    monkeypatch.setattr(gpu_check, "_relative", lambda a, b: 1.0 + real(a, b))
    assert gpu_check.main(["--quick", "--device", "cpu", "--cases", "gla"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_sync_warnings_are_told_apart_by_source_line(gpu_check, tmp_path):
    import warnings

    source = tmp_path / "code.py"
    source.write_text("values = torch.linalg.svdvals(x)\nflag = bool(mask.any())\n")

    def warning(line: int, text: str = "called a synchronizing CUDA operation") -> warnings.WarningMessage:
        return warnings.WarningMessage(UserWarning(text), UserWarning, str(source), line)

    ours, linalg = gpu_check.sync_sources([warning(1), warning(2), warning(2), warning(2, "other")])
    assert ours == {"code.py:2": 2} and linalg == {"code.py:1": 1}


def test_penalty_time_differentiates_the_penalty_alone():
    """The operators are rebuilt over detached leaves, so timing the penalty's backward never runs
    the model's backward between an earlier layer's operator and a later one's."""
    import sys

    sys.path.insert(0, str(_PATH.parent))
    try:
        from regularizer_cases import _detach_pending, build
    finally:
        sys.path.remove(str(_PATH.parent))
    from ess_reg import ESSRegularizer

    case = build("gla", small=True)
    reg = ESSRegularizer(case.model)
    case.loss(case.model, case.inputs)
    leaves = _detach_pending(reg)
    assert leaves and all(leaf.is_leaf and leaf.requires_grad for leaf in leaves)
    grads = torch.autograd.grad(reg(), leaves, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    reg.remove()


def test_bench_regularizer_peak_memory_runs_each_mode_in_a_subprocess(monkeypatch):
    import sys

    sys.path.insert(0, str(_PATH.parent))
    try:
        import bench_regularizer
    finally:
        sys.path.remove(str(_PATH.parent))
    assert bench_regularizer.step_peak_mib("gla", "attach") >= 0
    calls = []

    class Done:
        stdout = "0.0\n"

    monkeypatch.setattr(bench_regularizer.subprocess, "run", lambda cmd, **kw: calls.append(cmd) or Done())
    lines = bench_regularizer.peak_memory("attention")
    assert len(calls) == 3 and all("step_peak_mib('attention'" in cmd[-1] for cmd in calls)
    assert [line.split()[1] for line in lines[1:]] == ["none", "loss", "attach"]
