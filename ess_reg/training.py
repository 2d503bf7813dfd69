"""The main job: train a ``SequenceModel`` on a synthetic task while logging ESS."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ess_reg.analysis import layer_report
from ess_reg.capture import capture_operators
from ess_reg.distill import distillation_loss
from ess_reg.metric import ESSMetric
from ess_reg.models import AutoEncoderModel, SequenceModel
from ess_reg.plots import plot_ess_curves, plot_training
from ess_reg.tasks import TASKS, SyntheticTask, accuracy, loss_fn


@dataclass
class TrainConfig:
    """Everything a run needs; saved as ``config.json``. Defaults: MQAR, ``L = 64``, 4 kv pairs,
    a 2-layer GLA with ``d_model = 64``."""

    mixer: str = "gla"
    task: str = "mqar"
    seq_len: int = 64
    kv_pairs: int = 4
    vocab_size: int = 256
    copy_tokens: int = 16
    d_model: int = 64
    layers: int = 2
    steps: int = 2000
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    train_examples: int = 20_000
    test_examples: int = 512
    log_every: int = 100
    ess_examples: int = 16
    ess_splits: int = 16
    seed: int = 0
    device: str = "cpu"
    out: str = "runs/default"
    reg_weight: float = 0.0
    reg_target: str = "max"
    reg_kind: str = "soft_tolerance"  # the ESS variant that lifted a collapsed model (docs/regularizer.md)
    reg_splits: int | str | None = 8  # a count, None (all) or "boundary" (MQAR's context/query split)
    reg_schedule: str = "constant"  # or linear_decay / cosine_decay over the run's steps
    reg_transition_weight: float = 0.0  # adds the paper's ||A - I||_F penalty to an ESS regularizer
    reg_max_operators: int | str = "auto"  # per layer and step: "auto", "all" or a count (random subset)
    tensorboard: bool = False
    init: str = "none"
    mixer_kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint_every: int | None = None  # steps between checkpoints; None: at every evaluation
    teacher: str | None = None  # a run folder: train by distillation from that run's model
    distill_temperature: float = 2.0  # of the softened distributions (distillation_loss)
    distill_weight: float = 1.0  # loss = w * distillation + (1 - w) * task cross-entropy

    def mixers(self) -> str | list[str]:
        names = [m.strip() for m in self.mixer.split(",") if m.strip()]
        return names[0] if len(names) == 1 else names


def make_task(config: TrainConfig, num_examples: int, seed: int) -> SyntheticTask:
    """The configured task with ``num_examples`` examples drawn with ``seed``."""
    if config.task == "mqar":
        return TASKS["mqar"](num_examples, config.seq_len, config.kv_pairs, config.vocab_size,
                             seed=seed)
    if config.task == "selective_copying":
        return TASKS["selective_copying"](num_examples, config.seq_len, config.copy_tokens,
                                          config.vocab_size, seed=seed)
    if config.task == "compression":
        return TASKS["compression"](num_examples, config.seq_len, config.vocab_size, seed=seed)
    raise ValueError(f"task must be one of {sorted(TASKS)}, got {config.task!r}")


def make_test_task(config: TrainConfig) -> SyntheticTask:
    """The run's held-out examples (their own seed, never the training examples')."""
    return make_task(config, config.test_examples, seed=config.seed + 1_000_003)


def make_model(config: TrainConfig) -> torch.nn.Module:
    kwargs = dict(config.mixer_kwargs)
    if config.task == "compression":
        return AutoEncoderModel(config.mixers(), config.d_model, config.layers, config.vocab_size,
                                max_len=config.seq_len, **kwargs)
    return SequenceModel(config.mixers(), config.d_model, config.layers, config.vocab_size, **kwargs)


def load_run(path: str | Path, device: str = "cpu") -> tuple[torch.nn.Module, TrainConfig]:
    """Load a run folder (or its ``checkpoint.pt``): the trained model and its config."""
    model, config, _ = _load_run_state(path, device)
    return model, config


def _load_run_state(path: str | Path, device: str) -> tuple[torch.nn.Module, TrainConfig, dict[str, Any]]:
    """:func:`load_run`, plus the checkpoint's contents (its ``step``, for one)."""
    path = Path(path)
    checkpoint = path / "checkpoint.pt" if path.is_dir() else path
    if not checkpoint.exists():
        raise ValueError(f"no checkpoint at {checkpoint}; pass a run folder written by 'ess-reg train'")
    state = torch.load(checkpoint, map_location=device, weights_only=True)
    config = saved_config(state["train_config"])
    model = make_model(config)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:  # written by another version of the model code
        first = str(error).strip().splitlines()
        raise ValueError(f"{checkpoint} does not fit the model its config builds: "
                         f"{' '.join(line.strip() for line in first[:3])}") from None
    return model.to(device).eval(), config, state


#: Fields a resumed run may change: none of them alters the parameters reached at a given step
#: (``steps`` moves the cosine schedule's horizon, so extending a run changes its later steps).
RESUMABLE_CHANGES = ("steps", "checkpoint_every", "device", "tensorboard", "out")

#: Files a run writes into its folder (removed first when a folder is overwritten).
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.pt", "init_report.txt", "training.png",
             "ess_curves.png")


@dataclass
class _Run:
    """The mutable state of a training run: what a checkpoint saves and restores."""

    config: TrainConfig
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    penalty: Any
    teacher: torch.nn.Module | None = None  # frozen; not part of the checkpoint (config.teacher is)
    step: int = 0
    elapsed: float = 0.0

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically; loads with ``weights_only=True``."""
        return {"model": self.model.state_dict(), "train_config": dataclasses.asdict(self.config),
                "step": self.step, "elapsed_s": self.elapsed,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.schedule.state_dict(),
                "penalty": _penalty_state(self.penalty), "rng": _rng_state(self.generator)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpoint written by :meth:`state_dict`."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        _load_penalty_state(self.penalty, state["penalty"])
        _load_rng_state(self.generator, state["rng"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed_s"])


def train(config: TrainConfig, *, progress: bool = True, overwrite: bool = False,
          resume: bool = False) -> dict[str, Any]:
    """Train, log ESS every ``log_every`` steps, write the run folder; returns the last record.

    A non-empty ``config.out`` is refused (``FileExistsError``) unless ``overwrite`` (start again,
    replacing the run's files) or ``resume`` (continue from its ``checkpoint.pt`` up to
    ``config.steps``; build the config with :func:`resume_config`)."""
    _validate(config)
    if overwrite and resume:
        raise ValueError("overwrite and resume exclude each other: pass one of --overwrite, --resume")
    out = Path(config.out)
    teacher = load_teacher(config)  # a bad teacher stops the run before its folder is touched
    if resume:
        checkpoint: dict[str, Any] | None = _resume_state(out, config)
    else:
        checkpoint = None
        _claim_folder(out, overwrite)
    torch.manual_seed(config.seed)
    device = torch.device(config.device)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    train_set = make_task(config, config.train_examples, seed=config.seed)
    test_set = make_test_task(config)
    model = make_model(config).to(device)
    if checkpoint is None and config.init != "none":
        _initialize(model, config, train_set.inputs[:8].to(device), out, progress)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    run = _Run(config, model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config)),
               torch.Generator().manual_seed(config.seed), make_penalty(model, config),
               teacher=None if teacher is None else teacher.to(device))
    if checkpoint is not None:
        run.load_state_dict(checkpoint)
    records = _metrics_so_far(out / "metrics.jsonl", run.step)
    try:
        _loop(run, train_set, test_set, records, out, progress)
    finally:
        if run.penalty is not None:
            run.penalty.remove()
    plot_training(records, out / "training.png")
    report = layer_report(model, test_set.inputs[: config.ess_examples].to(device), config)
    save_curve_plot(report, out / "ess_curves.png", config.seq_len,
                    f"ESS after training ({config.mixer}, {config.task})")
    return records[-1]


#: Per task, the fields a teacher and its student must share: they see examples of one kind.
TASK_FIELDS = {"mqar": ("seq_len", "kv_pairs", "vocab_size"),
               "selective_copying": ("seq_len", "copy_tokens", "vocab_size"),
               "compression": ("seq_len", "vocab_size")}


def load_teacher(config: TrainConfig) -> torch.nn.Module | None:
    """The frozen model of the run folder ``config.teacher`` (None without one), on ``config.device``;
    its task must be the student's (:data:`TASK_FIELDS`)."""
    if config.teacher is None:
        return None
    try:
        teacher, teacher_config, state = _load_run_state(config.teacher, device="cpu")
    except ValueError as error:
        raise ValueError(f"teacher {config.teacher!r}: {error}") from None
    except Exception as error:  # any unreadable file: say what was expected
        raise ValueError(f"teacher {config.teacher!r} is not a run folder (or checkpoint.pt) written by "
                         f"ess-reg train: {type(error).__name__}: {error}") from None
    if "step" in state and int(state["step"]) < teacher_config.steps:
        raise ValueError(f"teacher {config.teacher!r} is unfinished (step {int(state['step'])} of "
                         f"{teacher_config.steps}); finish it first: ess-reg train --resume {config.teacher}")
    fields = ("task", *TASK_FIELDS.get(config.task, ()))
    differ = [f"{name} {getattr(teacher_config, name)!r} vs {getattr(config, name)!r}"
              for name in fields if getattr(teacher_config, name) != getattr(config, name)]
    if differ:
        raise ValueError(f"teacher {config.teacher!r} was trained on another task than the student "
                         f"(teacher vs student: {'; '.join(differ)}); give the student the teacher's task")
    return teacher.requires_grad_(False).eval()


def saved_config(fields: dict[str, Any]) -> TrainConfig:
    """The ``TrainConfig`` of a checkpoint; fields added since it was written keep the behaviour it
    ran with (``reg_max_operators``: ``"all"``, every operator)."""
    fields = dict(fields)
    fields.setdefault("reg_max_operators", "all")
    return TrainConfig(**fields)


def resume_config(run: str | Path, **changes: Any) -> TrainConfig:
    """The config saved in ``run``'s checkpoint, with ``out = run`` and ``changes`` (only the
    fields in :data:`RESUMABLE_CHANGES`) applied; pass it to ``train(..., resume=True)``."""
    fixed = sorted(set(changes) - set(RESUMABLE_CHANGES))
    if fixed:
        raise ValueError(f"a resumed run keeps its config; cannot change {', '.join(fixed)} "
                         f"(only {', '.join(RESUMABLE_CHANGES)})")
    state = _load_checkpoint(Path(run))
    return dataclasses.replace(saved_config(state["train_config"]), out=str(run), **changes)


def _loop(run: _Run, train_set: SyntheticTask, test_set: SyntheticTask, records: list[dict[str, Any]],
          out: Path, progress: bool) -> None:
    """Steps ``run.step + 1 .. config.steps``, logging and checkpointing on their cadences."""
    config, device = run.config, torch.device(run.config.device)
    every = config.checkpoint_every or config.log_every
    writer = _tensorboard_writer(out, run.step + 1) if config.tensorboard else None
    start = time.perf_counter() - run.elapsed
    bar = tqdm(range(run.step + 1, config.steps + 1), disable=not progress, initial=run.step,
               total=config.steps, desc=f"{config.mixer} on {config.task}")
    for step in bar:
        logits, targets, task_loss, reg_loss = _step(run, train_set, device)
        run.step = step
        if step % config.log_every == 0 or step == config.steps:
            record = {"step": step, "loss": task_loss.item(), "lr": run.schedule.get_last_lr()[0],
                      **({} if reg_loss is None else {"reg_loss": reg_loss.item()}),
                      "train_accuracy": float(accuracy(logits.detach(), targets)),
                      **_evaluate(run.model, test_set, config, device, run.teacher),
                      "elapsed_s": round(time.perf_counter() - start, 2)}
            records.append(record)
            with (out / "metrics.jsonl").open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            if writer is not None:
                _write_scalars(writer, record)
        if step % every == 0 or step == config.steps:
            run.elapsed = time.perf_counter() - start
            save_checkpoint(run.state_dict(), out / "checkpoint.pt")
        bar.set_postfix(_progress_fields(task_loss.item(), records[-1] if records else None))
    if writer is not None:
        writer.close()


def _progress_fields(loss: float, record: dict[str, Any] | None) -> dict[str, str]:
    """The progress bar's fields: this step's loss, and the last evaluation's test accuracy and mean
    ESS over layers (also after a resume; "-" before the first evaluation)."""
    if record is None:
        return {"loss": f"{loss:.3f}", "acc": "-", "ess": "-"}
    ess = record.get("ess") or {}
    return {"loss": f"{loss:.3f}", "acc": f"{record['test_accuracy']:.2f}",
            "ess": f"{sum(ess.values()) / len(ess):.2f}" if ess else "-"}


def _step(run: _Run, train_set: SyntheticTask, device: torch.device):
    """One optimizer step on a batch drawn with the run's generator."""
    run.model.train()
    index = torch.randint(len(train_set), (run.config.batch_size,), generator=run.generator)
    inputs, targets = train_set.inputs[index].to(device), train_set.targets[index].to(device)
    logits = run.model(inputs)
    task_loss = loss = loss_fn(logits, targets)
    if run.teacher is not None:
        with torch.no_grad():
            teacher_logits = run.teacher(inputs)
        weight = run.config.distill_weight
        loss = weight * distillation_loss(logits, teacher_logits, targets,
                                          temperature=run.config.distill_temperature)
        if weight < 1:
            loss = loss + (1 - weight) * task_loss
    reg_loss = run.penalty() if run.penalty is not None else None
    loss = loss if reg_loss is None else loss + reg_loss
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), 1.0)
    run.optimizer.step()
    run.schedule.step()
    return logits, targets, task_loss, reg_loss


def _initialize(model: torch.nn.Module, config: TrainConfig, probe: torch.Tensor, out: Path,
                progress: bool) -> None:
    """``config.init``'s scheme (a fresh run only), its report saved as ``init_report.txt``."""
    from init_schemes import ess_init

    report = ess_init(model, probe=probe, scheme=config.init, seed=config.seed, verbose=False)
    (out / "init_report.txt").write_text(str(report) + "\n")
    if progress:
        print(report)


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, then an atomic ``os.replace``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _claim_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty run folder unless ``overwrite``; then remove the files a run writes."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file, not a run folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"run folder {out} is not empty: pass --overwrite to start it again or "
                                  f"--resume {out} to continue it")
        for name in RUN_FILES:
            (out / name).unlink(missing_ok=True)


def _load_checkpoint(run: Path) -> dict[str, Any]:
    """A resumable checkpoint of the run folder ``run``, on the CPU."""
    path = run / "checkpoint.pt"
    if not path.is_file():
        raise FileNotFoundError(f"cannot resume {run}: no checkpoint.pt there; pass a run folder written "
                                "by 'ess-reg train'")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "optimizer" not in state:
        raise ValueError(f"cannot resume {run}: its checkpoint.pt holds only the final model (written "
                         "before runs saved their training state)")
    return state


def _resume_state(out: Path, config: TrainConfig) -> dict[str, Any]:
    """The checkpoint to resume ``config`` from, checked against it."""
    state = _load_checkpoint(out)
    saved = saved_config(state["train_config"])
    changed = [f.name for f in dataclasses.fields(TrainConfig)
               if f.name not in RESUMABLE_CHANGES and getattr(saved, f.name) != getattr(config, f.name)]
    if changed:
        raise ValueError(f"cannot resume {out} with a different config ({', '.join(changed)}); only "
                         f"{', '.join(RESUMABLE_CHANGES)} may change")
    if config.steps < state["step"]:
        raise ValueError(f"cannot resume {out} to step {config.steps}: it is already at step {state['step']}")
    return state


def _metrics_so_far(path: Path, step: int) -> list[dict[str, Any]]:
    """The records up to ``step`` (a fresh run: none), rewriting ``path`` to hold just those: an
    interrupted run may have logged steps after its last checkpoint, which the resumed run redoes."""
    lines = path.read_text().splitlines() if step and path.exists() else []
    kept = [record for line in lines if line.strip() and (record := json.loads(line))["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
    os.replace(tmp, path)
    return kept


def _penalty_state(penalty: Any) -> dict[str, Any] | None:
    """The penalty's own ``state_dict`` (schedule position, split sampler), None without one; the
    sampler's state is stored under ``"generator"``, the checkpoint format's key."""
    if penalty is None:
        return None
    state = dict(penalty.state_dict())
    if "generator_state" in state:
        state["generator"] = state.pop("generator_state")
    return state


def _load_penalty_state(penalty: Any, state: dict[str, Any] | None) -> None:
    if penalty is None or state is None:
        return
    state = dict(state)
    if "generator" in state:
        state["generator_state"] = state.pop("generator")
    penalty.load_state_dict(state)


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """The batch generator's and torch's global (CPU and CUDA) RNG states."""
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    return {"data": generator.get_state(), "torch": torch.get_rng_state(), "cuda": cuda}


def _load_rng_state(generator: torch.Generator, state: dict[str, Any]) -> None:
    generator.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_penalty(model: torch.nn.Module, config: TrainConfig):
    """The configured regularizer (``None`` without one), used as a loss term: an
    :class:`ESSRegularizer`, the :class:`TransitionPenalty`, or both summed."""
    from ess_reg.regularizer import ESSRegularizer, TransitionPenalty

    transition = config.reg_transition_weight
    if config.reg_kind == "transition":
        transition, weight = transition + config.reg_weight, 0.0
    else:
        weight = config.reg_weight
    ess = None if weight == 0 else ESSRegularizer(
        model, weight=weight, kind=config.reg_kind, target=parse_target(config.reg_target),
        splits=_reg_splits(config), schedule=config.reg_schedule,
        total_steps=config.steps if config.reg_schedule != "constant" else None,
        generator=torch.Generator().manual_seed(config.seed),
        max_operators=None if config.reg_max_operators == "all" else config.reg_max_operators)
    baseline = None if transition == 0 else TransitionPenalty(model, transition)
    if ess is None or baseline is None:
        return ess if baseline is None else baseline
    return CombinedPenalty(ess, baseline)


class CombinedPenalty:
    """An ESS regularizer and the transition penalty, summed (one loss term; the ESS regularizer's
    schedule state is the one checkpoints save)."""

    def __init__(self, ess, transition) -> None:
        self.ess, self.transition = ess, transition

    def __call__(self) -> torch.Tensor:
        return self.ess() + self.transition().to(self.ess._device())

    def state_dict(self) -> dict[str, Any]:
        return self.ess.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ess.load_state_dict(state)

    def remove(self) -> None:
        self.ess.remove()
        self.transition.remove()


def _reg_splits(config: TrainConfig):
    """``reg_splits`` as ``ESSRegularizer`` takes it: a count, None for ``"all"``, or MQAR's
    boundary for ``"boundary"`` (any case)."""
    splits = config.reg_splits
    if isinstance(splits, str):
        word = splits.strip().lower()
        if word == "all":
            return None
        if word == "boundary":
            from ess_reg.tasks import BoundarySplits

            return BoundarySplits(2 * config.kv_pairs)
        raise ValueError(f"reg_splits must be a positive int, 'all' or 'boundary', got {splits!r}")
    if splits is not None and (isinstance(splits, bool) or not isinstance(splits, int) or splits < 1):
        raise ValueError(f"reg_splits must be a positive int, 'all' or 'boundary', got {splits!r}")
    return splits


def parse_target(text: str | float) -> str | float | tuple[str, float]:
    """``"max"``, ``"min"``, a number, or ``"at_least:U"`` (a floor ``U`` on each layer's utilization)."""
    if isinstance(text, int | float) or text in ("max", "min"):
        return text
    if isinstance(text, str) and text.startswith("at_least:"):
        try:
            floor = float(text.split(":", 1)[1])
        except ValueError:
            floor = float("nan")
        if math.isfinite(floor) and floor >= 0:
            return ("at_least", floor)
        raise ValueError(f"reg_target at_least:U needs a number U >= 0, got {text!r}")
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"reg_target must be 'max', 'min', a number or 'at_least:U', got {text!r}") from None


def save_curve_plot(report, path: Path, seq_len: int, title: str) -> Path:
    """ESS curve per layer, with the common state size drawn when the layers share one."""
    sizes = {r.tss for r in report}
    return plot_ess_curves({r.label: (r.splits, r.curve) for r in report}, path, seq_len=seq_len,
                           state_size=sizes.pop() if len(sizes) == 1 else None, title=title)


def _evaluate(model, test_set, config, device, teacher=None) -> dict[str, Any]:
    model.eval()
    with torch.no_grad():
        correct, total, divergence = 0.0, 0, 0.0
        for start in range(0, len(test_set), 256):
            inputs = test_set.inputs[start:start + 256].to(device)
            targets = test_set.targets[start:start + 256].to(device)
            logits = model(inputs)
            batch_acc = accuracy(logits, targets)
            correct += float(batch_acc) * inputs.shape[0]
            total += inputs.shape[0]
            if teacher is not None:  # at temperature 1: the plain KL from the teacher's predictions
                divergence += float(distillation_loss(logits, teacher(inputs), targets,
                                                      temperature=1.0)) * inputs.shape[0]
    with torch.no_grad():
        operators = capture_operators(model, test_set.inputs[: config.ess_examples].to(device))
    metric = ESSMetric(kind="both", splits=config.ess_splits)
    metric.update(operators)
    result = {k: float(v) for k, v in metric.compute().items()}
    modules = dict(model.named_modules())
    label = {name: f"{name} ({modules[name].name})" for name in operators}
    return {"test_accuracy": correct / total,
            **({} if teacher is None else {"test_distill_kl": divergence / total}),
            "ess": {label[n]: result[f"{n}/ess"] for n in operators},
            "ess_tolerance": {label[n]: result[f"{n}/ess_tolerance"] for n in operators},
            "metric": result}


def _tensorboard_writer(out: Path, first_step: int):
    """A writer that hides events at or after ``first_step`` left by an earlier (overwritten or
    interrupted) run in the same folder."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=first_step)


def _write_scalars(writer, record: dict[str, Any]) -> None:
    step = record["step"]
    for key in ("loss", "reg_loss", "train_accuracy", "test_accuracy", "lr"):
        if key in record:
            writer.add_scalar(f"train/{key}", record[key], step)
    for key, value in record["metric"].items():
        writer.add_scalar(key, value, step)
    writer.flush()


def _cosine(config: TrainConfig):
    def factor(step: int) -> float:
        if step < config.warmup_steps:
            return (step + 1) / config.warmup_steps
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def _validate(config: TrainConfig) -> None:
    for name in ("seq_len", "d_model", "layers", "steps", "batch_size", "log_every",
                 "train_examples", "test_examples", "ess_examples", "ess_splits", "vocab_size"):
        value = getattr(config, name)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    every = config.checkpoint_every
    if every is not None and (not isinstance(every, int) or every < 1):
        raise ValueError(f"checkpoint_every must be a positive integer or None, got {every!r}")
    if config.reg_kind not in ("entropy", "soft_tolerance", "transition"):
        raise ValueError(f"reg_kind must be entropy, soft_tolerance or transition, got {config.reg_kind!r}")
    if not config.reg_weight >= 0:
        raise ValueError(f"reg_weight must be >= 0, got {config.reg_weight}")
    count = config.reg_max_operators
    if count not in ("auto", "all") and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"reg_max_operators must be 'auto', 'all' or a positive integer, got {count!r}")
    if not config.reg_transition_weight >= 0:
        raise ValueError(f"reg_transition_weight must be >= 0, got {config.reg_transition_weight}")
    if config.reg_schedule not in ("constant", "linear_decay", "cosine_decay"):
        raise ValueError("reg_schedule must be constant, linear_decay or cosine_decay, got "
                         f"{config.reg_schedule!r}")
    _reg_splits(config)
    if str(config.reg_splits).strip().lower() == "boundary" and config.task != "mqar":
        raise ValueError(f"reg_splits 'boundary' is MQAR's context/query split; task is {config.task!r}")
    parse_target(config.reg_target)
    from init_schemes import SCHEMES

    if config.init not in ("none", "auto", *SCHEMES):
        raise ValueError(f"init must be none, auto or one of {sorted(SCHEMES)}, got {config.init!r}")
    if config.lr <= 0:
        raise ValueError(f"lr must be > 0, got {config.lr}")
    if config.teacher is not None and not isinstance(config.teacher, str):
        raise ValueError(f"teacher must be a run folder (a string) or None, got {config.teacher!r}")
    temperature = config.distill_temperature
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"distill_temperature must be a finite number > 0, got {temperature!r}")
    if not 0 <= config.distill_weight <= 1:
        raise ValueError(f"distill_weight must be in [0, 1], got {config.distill_weight!r}")
    if config.teacher is None and (config.distill_weight != 1.0 or config.distill_temperature != 2.0):
        raise ValueError("distill_temperature and distill_weight only apply with a teacher: "
                         "pass --teacher RUN")
    from ess_reg.mixers import MIXERS

    names = config.mixers()
    for name in [names] if isinstance(names, str) else names:
        if name not in MIXERS:
            raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    if config.task not in TASKS:
        raise ValueError(f"task must be one of {sorted(TASKS)}, got {config.task!r}")
    if config.device != "cpu" and not config.device.startswith(("cuda", "mps")):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {config.device!r}")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {config.device!r} requested but CUDA is not available")
