"""The main job: ``ess-reg train`` and ``ess-reg analyze``."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch

from ess_reg import training
from ess_reg.cli import main
from ess_reg.training import TrainConfig, load_run, resume_config, train


def _tiny(tmp_path, **overrides):
    config = dict(seq_len=16, kv_pairs=2, vocab_size=32, d_model=16, steps=6, batch_size=4,
                  log_every=3, train_examples=64, test_examples=16, ess_examples=2, ess_splits=4,
                  warmup_steps=2, out=str(tmp_path / "run"))
    config.update(overrides)
    return TrainConfig(**config)


def test_train_writes_the_run_folder(tmp_path):
    config = _tiny(tmp_path)
    last = train(config, progress=False)
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt", "training.png", "ess_curves.png"):
        assert (run / name).exists(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6] and last == records[-1]
    assert set(records[0]["ess"]) == {"blocks.0.mixer (gla)", "blocks.1.mixer (gla)"}
    model, loaded = load_run(run)
    assert loaded == config and model.mixer_names == ["gla", "gla"]


@pytest.mark.parametrize(("task", "mixer"), [("selective_copying", "s6,sa"), ("compression", "la")])
def test_train_other_tasks_and_hybrids(tmp_path, task, mixer):
    config = _tiny(tmp_path, task=task, mixer=mixer, seq_len=16, copy_tokens=3, vocab_size=8)
    assert 0 <= train(config, progress=False)["test_accuracy"] <= 1


def test_cli_train_then_analyze(tmp_path, capsys):
    out = str(tmp_path / "cli")
    args = ["train", "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--d-model", "16",
            "--steps", "4", "--batch-size", "4", "--log-every", "2", "--train-examples", "32",
            "--mixer", "ssd", "--out", out, "--no-progress"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert main(["analyze", out, "--examples", "4", "--splits", "5"]) == 0
    table = capsys.readouterr().out
    assert "ESS/kv" in table and "blocks.1.mixer" in table and "ssd" in table
    assert "verdict" in table and "total ESS / key-value pairs" in table and "no kv count" not in table
    assert any(v in table for v in ("healthy", "collapsed", "saturated"))
    assert (tmp_path / "cli" / "analyze_ess_curves.png").exists()
    assert main(["analyze", out, "--examples", "4", "--splits", "5", "--plot", str(tmp_path / "figs")]) == 0
    assert (tmp_path / "figs" / "analyze_ess_curves.png").exists()
    assert main(["analyze", out, "--examples", "4", "--splits", "5", "--plot", str(tmp_path / "c.eps")]) == 0
    assert (tmp_path / "c.eps").is_file()
    assert main(["analyze", out, "--examples", "4", "--plot", str(tmp_path / "figs.v2") + "/"]) == 0
    assert (tmp_path / "figs.v2" / "analyze_ess_curves.png").is_file()
    capsys.readouterr()
    assert main(["analyze", out, "--examples", "4", "--plot", str(tmp_path / "c.txt")]) == 2
    assert "'.txt' is not an image type" in capsys.readouterr().err and not (tmp_path / "c.txt").exists()


@pytest.mark.parametrize(
    "argv",
    [["train", "--steps", "0"], ["train", "--task", "sorting"], ["train", "--lr", "abc"],
     ["train", "--d-model", "x"]],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error" in err and "Traceback" not in err


def test_bad_values_exit_2_without_traceback(tmp_path, capsys):
    assert main(["train", "--mixer", "lstm", "--out", str(tmp_path / "x"), "--no-progress"]) == 2
    assert main(["analyze", str(tmp_path / "missing")]) == 2
    assert main(["analyze"]) == 2
    assert main(["train", "--seq-len", "15", "--out", str(tmp_path / "y"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "unknown mixer" in err and "no checkpoint" in err and "even" in err


@pytest.mark.slow
def test_default_model_learns_mqar(tmp_path):
    config = TrainConfig(seq_len=32, kv_pairs=2, steps=800, log_every=400, out=str(tmp_path / "l"))
    assert train(config, progress=False)["test_accuracy"] > 0.5


def test_train_with_init_and_tensorboard(tmp_path):
    config = _tiny(tmp_path, init="auto", tensorboard=True, mixer="s6")
    train(config, progress=False)
    run = tmp_path / "run"
    assert "utilization before" in (run / "init_report.txt").read_text()
    assert any((run / "tensorboard").iterdir())
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert "blocks.0.mixer/utilization" in record["metric"] and "ess/total" in record["metric"]


def test_regularizer_flags(tmp_path):
    for kind, target in (("entropy", "max"), ("soft_tolerance", "0.5"), ("transition", "max")):
        config = _tiny(tmp_path, reg_weight=0.1, reg_kind=kind, reg_target=target,
                       out=str(tmp_path / kind))
        assert "reg_loss" in train(config, progress=False)
    assert main(["train", "--init", "xavier", "--out", str(tmp_path / "z"), "--no-progress"]) == 2


def test_regularizer_on_every_split(tmp_path):
    config = _tiny(tmp_path, reg_weight=0.1, reg_splits=None, out=str(tmp_path / "all"))
    assert "reg_loss" in train(config, progress=False)


def test_regularizer_options_from_the_command_line(tmp_path):
    """Floor target, boundary splits, decaying schedule and the transition penalty together."""
    out = tmp_path / "combo"
    argv = ["train", *_TINY, "--steps", "4", "--out", str(out), "--reg-weight", "0.5",
            "--reg-kind", "soft_tolerance", "--reg-target", "at_least:0.6", "--reg-splits", "boundary",
            "--reg-schedule", "cosine_decay", "--reg-transition-weight", "0.1", "--reg-max-operators", "3"]
    assert main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    keys = ("reg_target", "reg_splits", "reg_schedule", "reg_max_operators")
    assert tuple(config[k] for k in keys) == ("at_least:0.6", "boundary", "cosine_decay", 3)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reg_loss"] > 0 for r in records)  # the transition term is always positive
    for bad in (["--reg-target", "at_least:x"], ["--reg-schedule", "step"], ["--reg-splits", "edge"],
                ["--reg-max-operators", "0"], ["--reg-max-operators", "some"],
                ["--task", "selective_copying", "--reg-splits", "boundary"]):
        try:
            code = main(["train", *_TINY, "--steps", "2", "--out", str(tmp_path / "bad"),
                         "--reg-weight", "1", *bad])
        except SystemExit as exit_:
            code = exit_.code
        assert code == 2, bad


_TINY = ["--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--d-model", "16", "--batch-size", "4",
         "--log-every", "3", "--train-examples", "32", "--no-progress"]


class _CrashError(RuntimeError):
    """Stands for a killed job."""


def _crash_during(monkeypatch, step: int) -> None:
    """Make the training loop fail in the middle of ``step`` (after its forward)."""
    calls, real = itertools.count(1), training.loss_fn

    def loss_fn(*args):
        if next(calls) == step:
            raise _CrashError(f"killed during step {step}")
        return real(*args)

    monkeypatch.setattr(training, "loss_fn", loss_fn)


def _steps(run) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _records(run) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]


@pytest.mark.parametrize("reg", [[], ["--reg-weight", "0.1", "--reg-splits", "4"]], ids=["plain", "ess_reg"])
def test_resume_after_a_crash_is_bit_identical(tmp_path, monkeypatch, reg):
    args = ["train", *_TINY, *reg, "--steps", "8", "--checkpoint-every", "4"]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    cut = tmp_path / "cut"
    with monkeypatch.context() as patch, pytest.raises(_CrashError):
        _crash_during(patch, 7)
        main([*args, "--out", str(cut)])
    assert torch.load(cut / "checkpoint.pt", weights_only=True)["step"] == 4
    assert _steps(cut) == [3, 6]  # step 6 was logged after the last checkpoint: it is redone
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    full, resumed = (torch.load(run / "checkpoint.pt", weights_only=True) for run in (tmp_path / "full", cut))
    assert full["step"] == resumed["step"] == 8 and full["model"].keys() == resumed["model"].keys()
    assert all(torch.equal(full["model"][k], resumed["model"][k]) for k in full["model"])
    assert _steps(cut) == [3, 6, 8] and _records(cut) == _records(tmp_path / "full")


def test_checkpoint_holds_the_training_state(tmp_path):
    train(_tiny(tmp_path, reg_weight=0.1, checkpoint_every=2), progress=False)
    run = tmp_path / "run"
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert set(state) == {"model", "train_config", "step", "elapsed_s", "optimizer", "scheduler", "penalty",
                          "rng"}
    assert state["step"] == 6 and state["penalty"]["step_count"] == 6
    assert isinstance(state["penalty"]["generator"], torch.Tensor)
    assert state["optimizer"]["state"] and state["scheduler"]["last_epoch"] == 6
    assert {"data", "torch"} <= set(state["rng"]) and TrainConfig(**state["train_config"]) == _tiny(
        tmp_path, reg_weight=0.1, checkpoint_every=2)
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".")) == []  # no temporary files


def test_resume_extends_and_appends(tmp_path):
    train(_tiny(tmp_path, steps=3), progress=False)
    run = tmp_path / "run"
    config = resume_config(run, steps=6)
    assert train(config, progress=False, resume=True)["step"] == 6 and _steps(run) == [3, 6]
    assert json.loads((run / "config.json").read_text())["steps"] == 6
    with pytest.raises(ValueError, match="already at step 6"):
        train(resume_config(run, steps=4), progress=False, resume=True)
    with pytest.raises(ValueError, match=r"different config \(lr\)"):
        train(dataclasses.replace(config, lr=0.1), progress=False, resume=True)
    with pytest.raises(ValueError, match="cannot change seed"):
        resume_config(run, seed=1)


def test_existing_out_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 99}\n')
    (out / "notes.txt").write_text("kept")
    args = ["train", *_TINY, "--steps", "3", "--out", str(out)]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--overwrite" in err and "--resume" in err
    with pytest.raises(FileExistsError, match="not empty"):
        train(_tiny(tmp_path), progress=False)
    assert main([*args, "--overwrite"]) == 0
    assert _steps(out) == [3] and (out / "notes.txt").read_text() == "kept"


def test_resume_errors_exit_2(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", "--resume", str(empty), "--no-progress"]) == 2
    assert main(["train", "--resume", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("no checkpoint.pt") == 2 and "Traceback" not in err
    torch.save({"model": {}, "train_config": {}}, empty / "checkpoint.pt")
    assert main(["train", "--resume", str(empty)]) == 2
    assert "holds only the final model" in capsys.readouterr().err
    assert main(["train", "--resume", str(empty), "--lr", "0.1", "--seed", "3", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "drop --lr, --overwrite, --seed" in err


def test_train_help_lists_the_resume_flags(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert exc.value.code == 0
    for flag in ("--resume RUN", "--overwrite", "--checkpoint-every N"):
        assert flag in text
    for default in ("default: start a new run", "default: refuse", "default: at every evaluation"):
        assert default in text


def test_train_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("sequence length L (default: 64)", "weight of the regularizer (0: none) (default: 0.0)",
                  "gla_s6", "(default: runs/default)", "(default: 0.003)"):
        assert shown in text, shown
    assert "(default: None)" not in text


def test_short_runs_evaluate_often_enough_to_draw_curves(tmp_path):
    out = tmp_path / "short"
    args = ["train", "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--d-model", "16",
            "--batch-size", "4", "--train-examples", "32", "--no-progress", "--steps", "20",
            "--out", str(out)]
    assert main(args) == 0
    assert _steps(out) == list(range(2, 21, 2))
    assert json.loads((out / "config.json").read_text())["log_every"] == 2


def test_progress_bar_fields_before_and_after_the_first_evaluation():
    from ess_reg.training import _progress_fields

    assert _progress_fields(1.23456, None) == {"loss": "1.235", "acc": "-", "ess": "-"}
    record = {"test_accuracy": 0.5, "ess": {"blocks.0.mixer": 2.0, "blocks.1.mixer": 4.0}}
    assert _progress_fields(0.5, record) == {"loss": "0.500", "acc": "0.50", "ess": "3.00"}
    assert _progress_fields(0.5, {"test_accuracy": 0.25, "ess": {}})["ess"] == "-"
