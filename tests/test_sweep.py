"""The sweep runner (benchmarks/sweep.py): a 2-cell grid, resumed, reported."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SWEEP = REPO / "benchmarks" / "sweep.py"

GRID = """
name = "smoke"
results = "{results}"
runs_dir = "{runs}"
seeds = [0, 1]

[base]
task = "mqar"
seq_len = 16
kv_pairs = 2
vocab_size = 32
d_model = 16
layers = 1
steps = 6
batch_size = 4
log_every = 3
train_examples = 32
test_examples = 16
ess_examples = 4
ess_splits = 4
warmup_steps = 1

[settings.gla]
mixer = "gla"

[cells.none]
reg_weight = 0.0

[cells.floor]
reg_weight = 0.5
reg_target = "at_least:0.9"
reg_splits = "boundary"
"""


def _sweep(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SWEEP), *args], capture_output=True, text=True,
                          timeout=300, cwd=REPO)


def test_two_cell_grid_runs_resumes_and_reports(tmp_path):
    results = tmp_path / "results.jsonl"
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.format(results=results, runs=tmp_path / "runs"))
    first = _sweep("run", str(grid), "--seeds", "0")
    assert first.returncode == 0, first.stderr
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert sorted(r["key"] for r in records) == ["gla/floor/seed0", "gla/none/seed0"]
    assert all(0 <= r["test_accuracy"] <= 1 and r["utilization"] > 0 for r in records)
    for r in records:  # what the ESS-vs-TSS study reads: the layer's size and its measured ESS
        layer = r["layers"]["blocks.0.mixer"]
        assert layer == {"channels": 4, "tss": 2, "value_width": 4, "needed": layer["needed"]}
        assert list(r["layers"]) == ["blocks.0.mixer"] and 1 <= layer["needed"] <= 2
        assert r["metric"]["blocks.0.mixer/tss"] == 2 and r["metric"]["ess/total"] > 0
    again = _sweep("run", str(grid))  # seeds 0 and 1: only seed 1 runs
    assert again.returncode == 0, again.stderr
    assert "4 runs, 2 done, 2 to run" in again.stdout
    keys = [json.loads(line)["key"] for line in results.read_text().splitlines()]
    assert len(keys) == len(set(keys)) == 4
    status = _sweep("status", str(grid))
    assert "4/4 done" in status.stdout
    figure = tmp_path / "figures" / "report.png"
    report = _sweep("report", str(grid), "--reference", "none", "--figure", str(figure))
    assert report.returncode == 0, report.stderr
    assert "| floor |" in report.stdout and "paired diff vs none" in report.stdout
    assert "/2 |" in report.stdout  # wins out of two paired seeds
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_an_interrupted_run_continues_from_its_checkpoint(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sweep
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    from ess_reg.training import TrainConfig, train

    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(GRID.format(results=tmp_path / "r.jsonl", runs=tmp_path / "runs"))
    grid = sweep.load_grid(grid_path, seeds=[0])
    run = next(r for r in grid.runs if r.cell == "none")
    folder = grid.runs_dir / run.key
    train(TrainConfig(**{**run.config, "out": str(folder)}), progress=False)  # stands for a killed run
    record = sweep.train_one(run, str(folder))
    assert record["resumed"] and record["key"] == "gla/none/seed0"
    changed = sweep.Run(run.setting, run.cell, run.seed, {**run.config, "lr": 1e-3})
    assert not sweep.train_one(changed, str(folder))["resumed"]  # the grid changed: start again


def _load_sweep():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import sweep
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    return sweep


def test_bad_cells_fail_at_load_and_partial_lines_are_skipped(tmp_path):
    import pytest

    sweep = _load_sweep()
    grid_path = tmp_path / "grid.toml"
    base = GRID.format(results=tmp_path / "r.jsonl", runs=tmp_path / "runs")
    grid_path.write_text(base + '\n[cells.bad]\nreg_weight = 1.0\nreg_splits = "edge"\n')
    with pytest.raises(ValueError, match="cell 'bad'.*reg_splits must be"):
        sweep.load_grid(grid_path)
    grid_path.write_text(base + '\n[cells.odd]\nsettings = "gla"\nreg_weight = 0.0\n')
    with pytest.raises(ValueError, match="cell 'odd': settings must be a list"):
        sweep.load_grid(grid_path)
    grid_path.write_text(base + '\n[cells.all]\nreg_weight = 0.1\nreg_splits = "all"\n')
    grid = sweep.load_grid(grid_path, seeds=[0])
    assert len(grid.runs) == 3
    grid.results.write_text('{"key": "gla/none/seed0", "test_accuracy": 0.5}\n{"key": "gla/fl')
    assert list(grid.done()) == ["gla/none/seed0"]


def test_a_failing_run_does_not_stop_the_others(tmp_path, monkeypatch):
    import pytest

    sweep = _load_sweep()
    grid_path = tmp_path / "grid.toml"
    grid_path.write_text(GRID.format(results=tmp_path / "r.jsonl", runs=tmp_path / "runs"))
    grid = sweep.load_grid(grid_path, seeds=[0])
    grid.runs[1] = sweep.Run("gla", "broken", 0, {**grid.runs[1].config, "steps": -1})
    with pytest.raises(RuntimeError, match=r"1 run\(s\) failed.*gla/broken/seed0"):
        sweep.run_grid(grid, workers=2, echo=False)
    assert list(grid.done()) == ["gla/none/seed0"]


def test_options_of_a_regularizer_a_run_does_not_have_do_not_restart_it():
    import importlib.util

    from ess_reg.training import TrainConfig

    spec = importlib.util.spec_from_file_location("sweep_under_test", SWEEP)
    sweep = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("sweep_under_test", sweep)  # dataclasses look their module up there
    spec.loader.exec_module(sweep)
    plain = TrainConfig(reg_max_operators="all")
    assert sweep.same_run(plain, TrainConfig()) and not sweep.same_run(plain, TrainConfig(steps=3))
    transition = TrainConfig(reg_kind="transition", reg_weight=1.0, reg_max_operators="all")
    assert sweep.same_run(transition, TrainConfig(reg_kind="transition", reg_weight=1.0))
    ess = TrainConfig(reg_weight=0.1, reg_max_operators="all")
    assert not sweep.same_run(ess, TrainConfig(reg_weight=0.1))


def test_several_grids_run_from_one_queue_into_their_own_results(tmp_path):
    paths = []
    for name in ("first", "second"):
        text = GRID.format(results=tmp_path / f"{name}.jsonl", runs=tmp_path / f"runs_{name}")
        text = text.split("[cells.floor]")[0].replace('name = "smoke"', f'name = "{name}"')
        path = tmp_path / f"{name}.toml"
        path.write_text(text)
        paths.append(path)
    done = _sweep("run", *map(str, paths), "--seeds", "0", "--workers", "2")
    assert done.returncode == 0, done.stderr
    for name in ("first", "second"):
        keys = [json.loads(line)["key"] for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert keys == ["gla/none/seed0"], name
        assert f"{name}: 1 runs, 0 done, 1 to run" in done.stdout


def test_gate_statistics_of_a_trained_run(tmp_path):
    import math

    from ess_reg.training import TrainConfig, train

    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from gate_statistics import gate_statistics
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    config = TrainConfig(task="mqar", seq_len=16, kv_pairs=2, vocab_size=32, d_model=16, layers=2,
                         steps=2, batch_size=4, log_every=2, train_examples=16, test_examples=8,
                         ess_examples=4, ess_splits=4, mixer="gla", out=str(tmp_path / "run"))
    train(config, progress=False)
    stats = gate_statistics(str(tmp_path / "run"), examples=4)
    assert list(stats) == ["blocks.0.mixer", "blocks.1.mixer"]
    for layer in stats.values():
        assert 0 < layer["mean_decay"] <= 1 and 0 <= layer["share_above_0_9"] <= 1
        assert all(math.isfinite(v) for v in layer.values())


def test_kept_models_are_model_only_loadable_teachers_and_restart_cleanly(tmp_path):
    import pytest
    import torch

    from ess_reg.training import TrainConfig, load_run, load_teacher

    sweep = _load_sweep()
    grid_path = tmp_path / "grid.toml"
    text = GRID.format(results=tmp_path / "r.jsonl", runs=tmp_path / "kept").split("[cells.floor]")[0]
    grid_path.write_text(text.replace('seeds = [0, 1]', 'seeds = [0, 1]\nkeep_models = true'))
    grid = sweep.load_grid(grid_path, seeds=[0])
    assert grid.keep_models
    sweep.run_grid(grid, echo=False)
    folder = tmp_path / "kept" / "gla" / "none" / "seed0"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt", "config.json", "metrics.jsonl"]
    state = torch.load(folder / "checkpoint.pt", weights_only=True)
    assert set(state) <= set(sweep.MODEL_ONLY) and "optimizer" not in state
    model, config = load_run(folder)
    assert config.steps == 6 and sum(p.numel() for p in model.parameters()) > 0
    student = TrainConfig(**{**grid.runs[0].config, "teacher": str(folder), "out": str(tmp_path / "s")})
    assert load_teacher(student) is not None  # a kept run is a finished teacher
    record = sweep.train_one(grid.runs[0], str(folder), keep_model=True)  # cannot resume: trains again
    assert not record["resumed"]
    assert "optimizer" not in torch.load(folder / "checkpoint.pt", weights_only=True)
    grid_path.write_text(text.replace('seeds = [0, 1]', 'seeds = [0, 1]\nkeep_models = "yes"'))
    with pytest.raises(ValueError, match="keep_models must be true or false"):
        sweep.load_grid(grid_path)
