"""Distillation: ``distillation_loss`` and ``ess-reg train --teacher``."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from ess_reg import distillation_loss
from ess_reg.cli import main
from ess_reg.training import TrainConfig, train


def _kl_reference(student, teacher, temperature):
    """KL(teacher || student) per position, float64, via torch's kl_div."""
    s = F.log_softmax(student.double() / temperature, -1)
    t = F.log_softmax(teacher.double() / temperature, -1)
    return F.kl_div(s, t, log_target=True, reduction="none").sum(-1) * temperature ** 2


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 7.0])
def test_loss_is_the_kl_divergence_on_scored_positions(temperature):
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, dtype=torch.float64), torch.randn(3, 5, 11) * 4
    targets = torch.randint(0, 11, (3, 5))
    targets[0, :3] = -100
    targets[2] = -100
    reference = _kl_reference(student, teacher, temperature)
    scored = targets != -100
    got = distillation_loss(student, teacher, targets, temperature=temperature)
    assert torch.allclose(got, reference[scored].mean(), rtol=1e-6)
    assert torch.allclose(distillation_loss(student, teacher, temperature=temperature), reference.mean(),
                          rtol=1e-6)


def test_loss_is_zero_at_the_teacher_and_its_gradient_reaches_only_the_student():
    torch.manual_seed(1)
    teacher = torch.randn(4, 9, requires_grad=True)
    student = teacher.detach().clone().requires_grad_(True)
    loss = distillation_loss(student, teacher)
    assert abs(loss.item()) < 1e-6
    other = torch.randn(4, 9, requires_grad=True)
    distillation_loss(other, teacher).backward()
    assert teacher.grad is None and other.grad is not None and other.grad.abs().sum() > 0


def test_masked_tokens_empty_batches_and_garbage_at_ignored_positions():
    torch.manual_seed(3)
    student, teacher = torch.randn(2, 4, 7, requires_grad=True), torch.randn(2, 4, 7)
    teacher[..., 0] = float("-inf")  # a token the teacher rules out
    log_s = F.log_softmax(student.double() / 2.0, -1)[..., 1:]
    log_t = F.log_softmax(teacher[..., 1:].double() / 2.0, -1)
    reference = (log_t.exp() * (log_t - log_s)).sum(-1).mean() * 4.0
    torch.testing.assert_close(distillation_loss(student, teacher).double(), reference, rtol=1e-5, atol=0)
    targets = torch.zeros(2, 4, dtype=torch.long)
    targets[1] = -100
    poisoned = teacher.clone()
    poisoned[1] = float("nan")
    loss = distillation_loss(student, poisoned, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
    empty = distillation_loss(torch.zeros(0, 7), torch.zeros(0, 7))
    assert empty.item() == 0.0


def test_loss_without_scored_positions_is_zero_and_finite():
    loss = distillation_loss(torch.randn(2, 3, 4, requires_grad=True), torch.randn(2, 3, 4),
                             torch.full((2, 3), -100))
    assert loss.item() == 0.0
    loss.backward()


def test_half_precision_logits_are_computed_in_float32():
    torch.manual_seed(2)
    student, teacher = torch.randn(2, 6, 50) * 30, torch.randn(2, 6, 50) * 30
    got = distillation_loss(student.half(), teacher.half(), temperature=4.0)
    assert got.dtype == torch.float32 and torch.isfinite(got)  # returned where it cannot overflow
    got = distillation_loss(student.half(), teacher.half())
    reference = distillation_loss(student.half().float(), teacher.half().float())
    assert torch.allclose(got.float(), reference, rtol=1e-2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [(dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 4)), "same shape"),
     (dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3), temperature=0), "temperature"),
     (dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3), temperature=float("inf")),
      "temperature"),
     (dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3), temperature=True),
      "temperature"),
     (dict(student_logits=torch.zeros(2, 3), teacher_logits=torch.zeros(2, 3), targets=torch.zeros(3)),
      "targets"),
     (dict(student_logits=[0.0], teacher_logits=torch.zeros(1)), "tensors"),
     (dict(student_logits=torch.zeros(2, 3, dtype=torch.long), teacher_logits=torch.zeros(2, 3)),
      "floating point")],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        distillation_loss(**kwargs)


def _tiny(tmp_path, name, **overrides):
    config = dict(seq_len=16, kv_pairs=2, vocab_size=32, d_model=16, steps=6, batch_size=8,
                  log_every=3, train_examples=64, test_examples=16, ess_examples=2, ess_splits=4,
                  warmup_steps=2, out=str(tmp_path / name))
    config.update(overrides)
    return TrainConfig(**config)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("teacher")
    train(_tiny(tmp_path, "teacher", steps=20, lr=1e-2), progress=False)
    return tmp_path / "teacher"


def test_a_student_learns_the_teachers_predictions(tmp_path, teacher_run):
    config = _tiny(tmp_path, "student", teacher=str(teacher_run), steps=40, log_every=4, lr=1e-2,
                   mixer_kwargs={"expand_k": 0.25})
    last = train(config, progress=False)
    records = [json.loads(line) for line in (tmp_path / "student" / "metrics.jsonl").read_text().splitlines()]
    divergences = [r["test_distill_kl"] for r in records]
    assert all(d >= 0 for d in divergences) and last["test_distill_kl"] == divergences[-1]
    assert divergences[-1] < 0.7 * divergences[0]


def test_distillation_weight_zero_is_plain_training(tmp_path, teacher_run):
    plain = train(_tiny(tmp_path, "plain"), progress=False)
    mixed = train(_tiny(tmp_path, "mixed", teacher=str(teacher_run), distill_weight=0.0), progress=False)
    assert mixed["loss"] == plain["loss"] and mixed["test_accuracy"] == plain["test_accuracy"]
    assert "test_distill_kl" in mixed and "test_distill_kl" not in plain


def test_a_distilled_run_resumes_bit_identically(tmp_path, teacher_run, monkeypatch):
    from ess_reg import training

    whole = train(_tiny(tmp_path, "whole", teacher=str(teacher_run)), progress=False)
    calls, real = itertools.count(1), training.distillation_loss

    def crash_in_step_5(*args, **kwargs):  # calls: steps 1-3, the evaluation at 3, step 4, step 5
        if next(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(training, "distillation_loss", crash_in_step_5)
        train(_tiny(tmp_path, "cut", teacher=str(teacher_run)), progress=False)
    assert torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = train(training.resume_config(tmp_path / "cut"), progress=False, resume=True)
    assert resumed["loss"] == whole["loss"] and resumed["test_distill_kl"] == whole["test_distill_kl"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [(dict(kv_pairs=3), "kv_pairs 2 vs 3"), (dict(task="compression"), "task 'mqar' vs 'compression'"),
     (dict(distill_temperature=0.0), "distill_temperature"), (dict(distill_weight=1.5), "distill_weight")],
)
def test_mismatched_or_bad_distillation_settings_are_refused(tmp_path, teacher_run, overrides, message):
    with pytest.raises(ValueError, match=message):
        train(_tiny(tmp_path, "bad", teacher=str(teacher_run), **overrides), progress=False)
    assert not (tmp_path / "bad").exists()  # refused before the run folder was touched


def test_distillation_settings_without_a_teacher_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--teacher"):
        train(_tiny(tmp_path, "lonely", distill_temperature=4.0), progress=False)


def test_a_folder_that_is_not_a_run_is_named(tmp_path):
    bogus = tmp_path / "bogus"
    bogus.mkdir()
    (bogus / "checkpoint.pt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a run folder"):
        train(_tiny(tmp_path, "s", teacher=str(bogus)), progress=False)


def test_missing_or_unfinished_teachers_are_refused(tmp_path, teacher_run):
    with pytest.raises(ValueError, match="no checkpoint"):
        train(_tiny(tmp_path, "a", teacher=str(tmp_path / "nowhere")), progress=False)
    state = torch.load(teacher_run / "checkpoint.pt", weights_only=True)
    state["step"] = 5
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    torch.save(state, unfinished / "checkpoint.pt")
    with pytest.raises(ValueError, match="unfinished .step 5 of 20.*--resume"):
        train(_tiny(tmp_path, "b", teacher=str(unfinished)), progress=False)


def test_cli_trains_a_student(tmp_path, teacher_run, capsys):
    out = str(tmp_path / "cli")
    args = ["train", "--seq-len", "16", "--kv-pairs", "2", "--vocab-size", "32", "--d-model", "16",
            "--steps", "3", "--batch-size", "4", "--log-every", "3", "--train-examples", "32",
            "--teacher", str(teacher_run), "--distill-temperature", "3", "--out", out, "--no-progress"]
    assert main(args) == 0
    saved = json.loads((tmp_path / "cli" / "config.json").read_text())
    assert saved["teacher"] == str(teacher_run) and saved["distill_temperature"] == 3.0


# -- distill_student: the reusable loop ------------------------------------------------------------
def _models(seed=0):
    from ess_reg.models import SequenceModel

    torch.manual_seed(seed)
    teacher = SequenceModel("gla", 16, 1, 32)
    student = SequenceModel("gla", 16, 1, 32, expand_k=0.25)
    return teacher, student


def _batches(count, seed=0):
    from ess_reg.tasks import MQAR

    task = MQAR(8 * count, 16, 2, 32, seed=seed)
    return [(task.inputs[k * 8:(k + 1) * 8], task.targets[k * 8:(k + 1) * 8]) for k in range(count)]


def test_distill_student_lowers_the_divergence_and_leaves_the_teacher_alone():
    from ess_reg import distill_student

    teacher, student = _models()
    teacher.train()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    test_inputs, test_targets = _batches(1, seed=9)[0]

    def divergence():
        with torch.no_grad():
            return float(distillation_loss(student.eval()(test_inputs), teacher.eval()(test_inputs),
                                           test_targets))

    start = divergence()
    teacher.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = distill_student(student, teacher, _batches(30) * 2, optimizer)
    assert teacher.training  # its mode is restored
    assert losses.shape == (60,) and not losses.requires_grad and torch.isfinite(losses).all()
    assert divergence() < 0.7 * start
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert all(p.grad is None for p in teacher.parameters())


def test_distill_student_mixes_the_task_loss_and_a_penalty():
    from ess_reg import ESSRegularizer, distill_student

    teacher, student = _models()
    reg = ESSRegularizer(student, weight=0.1, target="min")
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # the loss only, nothing moves
    batches = _batches(2)
    mixed = distill_student(student, teacher, batches, optimizer, weight=0.5, penalty=reg)
    inputs, targets = batches[0]
    with torch.no_grad():
        logits = student(inputs)
        task = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        expected = 0.5 * distillation_loss(logits, teacher.eval()(inputs), targets) + 0.5 * task
    reg.remove()
    assert float(mixed[0]) > float(expected)  # plus the (positive) penalty
    plain = distill_student(student, teacher, batches, optimizer, weight=0.5)
    torch.testing.assert_close(plain[0], expected, rtol=1e-5, atol=1e-6)


def test_distill_student_takes_outputs_with_logits_and_bare_inputs():
    from types import SimpleNamespace

    from ess_reg import distill_student

    teacher, student = _models()

    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, ids):
            return SimpleNamespace(logits=self.inner(ids))

    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    inputs = [inputs for inputs, _ in _batches(3)]
    losses = distill_student(Wrapped(student), Wrapped(teacher), inputs, optimizer)
    assert losses.shape == (3,) and torch.isfinite(losses).all()
    assert distill_student(student, teacher, [], optimizer).shape == (0,)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"weight": 1.5}, "weight must be a number in"),
    ({"max_grad_norm": 0}, "max_grad_norm"),
    ({"batches": [object()]}, "batch 0 must be"),
    ({"batches": [torch.zeros(2, 16, dtype=torch.long)], "weight": 0.5}, "has no targets"),
    ({"optimizer": "adam"}, "optimizer must be"),
    ({"teacher": "student"}, "different modules"),
])
def test_distill_student_names_bad_arguments(kwargs, message):
    from ess_reg import distill_student

    teacher, student = _models()
    arguments = {"student": student, "teacher": teacher, "batches": _batches(1),
                 "optimizer": torch.optim.SGD(student.parameters(), lr=0.1)}
    if kwargs.get("teacher") == "student":
        kwargs = {"teacher": student}
    arguments.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=message):
        distill_student(**arguments)
