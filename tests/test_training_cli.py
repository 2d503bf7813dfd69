"""The main job: ``ess-reg train`` and ``ess-reg analyze``."""

from __future__ import annotations

import json

import pytest

from ess_reg.cli import main
from ess_reg.training import TrainConfig, load_run, train


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
    assert (tmp_path / "cli" / "analyze_ess_curves.png").exists()


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
