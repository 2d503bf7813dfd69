"""The ``ess-reg`` console script: ``train``, ``analyze`` and ``showcase``."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path


class _Parser(argparse.ArgumentParser):
    """Exits with code 2 and a one-line message on bad arguments."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _splits(text: str) -> int | None:
    """A positive number of splits, or ``all`` (``None``: every split)."""
    if text.strip().lower() == "all":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a positive integer or 'all', got {text!r}") from None


def _reg_splits(text: str) -> int | str | None:
    """Like ``_splits``, or ``boundary`` (MQAR's context/query split)."""
    if text.strip().lower() == "boundary":
        return "boundary"
    if text.strip().lower() == "all":
        return None
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be a positive integer, 'all' or 'boundary', got {text!r}") from None


def _count_or_all(text: str) -> int | str:
    """A positive count, ``auto`` or ``all``."""
    if text.strip().lower() in ("auto", "all"):
        return text.strip().lower()
    try:
        return _positive(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"must be 'auto', 'all' or a positive integer, got {text!r}") from None


def _evenly_spaced_splits(text: str) -> int:
    """A positive number of evenly spaced splits; ``all`` asks for more than any sequence has."""
    count = _splits(text)
    return _EVERY_SPLIT if count is None else count


#: A split count no sequence reaches: ``resolve_splits`` then takes all ``L - 1`` splits.
_EVERY_SPLIT = 1 << 62


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


class _DefaultsHelp(argparse.HelpFormatter):
    """Help that shows each option's default, unless its text already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is argparse.SUPPRESS or action.default is False
        if "default" in text or unset or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)" if text else "default: %(default)s"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ess-reg", description="Effective state-size of sequence models.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = commands.add_parser("train", help="train a SequenceModel on a synthetic task, logging ESS",
                                formatter_class=_DefaultsHelp)
    _add_train_arguments(train)

    analyze = commands.add_parser("analyze", help="per-layer ESS table of a trained run")
    analyze.add_argument("run", nargs="?", help="run folder or checkpoint.pt written by 'ess-reg train'")
    analyze.add_argument("--hf", metavar="CONFIG_OR_PATH",
                         help="analyze a transformers model from a local folder (config.json, with or "
                              "without weights; nothing is downloaded) instead of a run")
    analyze.add_argument("--ids", help="--hf: comma-separated token ids of one input sequence")
    analyze.add_argument("--text", help="--hf: a text file, tokenized with the folder's tokenizer")
    analyze.add_argument("--seq-len", type=_positive, default=64,
                         help="--hf: length of the random token sequences used without --ids/--text")
    analyze.add_argument("--examples", type=_positive, default=32, help="fresh task inputs to analyse")
    analyze.add_argument("--splits", type=_evenly_spaced_splits, default=None,
                         help="evenly spaced splits, or all (default: all; 64 for attention-like "
                              "layers with L > 257)")
    analyze.add_argument("--seed", type=int, default=12345, help="seed of the fresh inputs")
    analyze.add_argument("--device", default="cpu")
    analyze.add_argument("--plot", "--out", dest="plot", metavar="PATH", default=None,
                         help="where to save the ESS-curve plot: a .png/.pdf/.svg file or a folder "
                              "(default: the run folder; with --hf no plot unless given, so nothing "
                              "is written into a model folder)")

    show = commands.add_parser("showcase", help="ESS of random operators of common mixer families")
    show.add_argument("--seq-len", type=_positive, default=256, help="sequence length L")
    show.add_argument("--state", type=_positive, default=16, help="state size N per channel")
    show.add_argument("--channels", type=_positive, default=8, help="channels per operator")
    show.add_argument("--splits", type=_evenly_spaced_splits, default=None,
                      help="evenly spaced splits (default all)")
    show.add_argument("--seed", type=int, default=0)
    return parser


#: Flags ``--resume`` accepts besides itself; the rest of the config comes from the checkpoint.
_RESUME_FLAGS = ("--steps", "--checkpoint-every", "--device", "--tensorboard", "--no-progress")


def _add_train_arguments(train: argparse.ArgumentParser) -> None:
    from ess_reg.mixers import MIXERS
    from ess_reg.tasks import TASKS
    from ess_reg.training import TrainConfig

    defaults = TrainConfig()
    train.add_argument("--mixer", default=defaults.mixer,
                       help=f"mixer name, or a comma-separated list per layer ({', '.join(MIXERS)})")
    train.add_argument("--task", default=defaults.task, choices=sorted(TASKS), help="synthetic task")
    train.add_argument("--seq-len", type=_positive, default=defaults.seq_len, help="sequence length L")
    train.add_argument("--kv-pairs", type=_positive, default=defaults.kv_pairs, help="MQAR key-value pairs")
    train.add_argument("--copy-tokens", type=_positive, default=defaults.copy_tokens,
                       help="selective copying: tokens to copy")
    train.add_argument("--vocab-size", type=_positive, default=defaults.vocab_size, help="number of tokens")
    train.add_argument("--d-model", type=_positive, default=defaults.d_model, help="model width")
    train.add_argument("--layers", type=_positive, default=defaults.layers, help="mixer blocks")
    train.add_argument("--steps", type=_positive, default=defaults.steps, help="optimizer steps")
    train.add_argument("--batch-size", type=_positive, default=defaults.batch_size, help="examples per step")
    train.add_argument("--lr", type=_positive_float, default=defaults.lr,
                       help="AdamW learning rate (warm-up, then cosine decay)")
    train.add_argument("--log-every", type=_positive, default=None,
                       help=f"evaluate accuracy and ESS every N steps (default: a tenth of --steps, at most "
                            f"{defaults.log_every}, so short runs still draw curves)")
    train.add_argument("--train-examples", type=_positive, default=defaults.train_examples,
                       help="size of the generated training set")
    train.add_argument("--seed", type=int, default=defaults.seed, help="seed of the model, data and splits")
    train.add_argument("--device", default=defaults.device, help="cpu, cuda or cuda:N")
    train.add_argument("--out", default=defaults.out, help="run folder")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    from init_schemes import SCHEMES

    train.add_argument("--init", default=defaults.init,
                       help="none (constructor init), auto (ess_init's search) or a scheme name "
                            f"({', '.join(SCHEMES)})")
    train.add_argument("--tensorboard", action="store_true",
                       help="also log to TensorBoard (RUN/tensorboard; needs the tensorboard package)")
    train.add_argument("--reg-weight", type=float, default=defaults.reg_weight,
                       help="weight of the regularizer (0: none)")
    train.add_argument("--reg-target", default=defaults.reg_target,
                       help="max (reward ESS), min (penalise it), a target utilization, or at_least:U "
                            "(penalise only a utilization below U)")
    train.add_argument("--reg-kind", default=defaults.reg_kind,
                       choices=["entropy", "soft_tolerance", "transition"],
                       help="ESS regularizer kind (soft_tolerance: the smooth count of singular values, "
                            "the variant that lifted a collapsed model in docs/regularization.md), or the "
                            "paper's ||A - I||_F transition penalty (better for states of about 4 per head)")
    train.add_argument("--reg-splits", type=_reg_splits, default=defaults.reg_splits,
                       help="random splits per step for the ESS regularizer ('all': every split; "
                            "'boundary': MQAR's context/query split)")
    train.add_argument("--reg-schedule", default=defaults.reg_schedule,
                       choices=["constant", "linear_decay", "cosine_decay"],
                       help="the ESS weight over the run: constant, or decaying to 0 at --steps "
                            "(the transition penalty stays constant)")
    train.add_argument("--reg-max-operators", type=_count_or_all, default=defaults.reg_max_operators,
                       metavar="auto|all|K", help="per layer and step, the ESS penalty measures K of the "
                       "layer's batch x channel operators drawn at random; auto (default) keeps each layer's "
                       "cost to about 3e7 multiply-adds, all measures every one")
    train.add_argument("--reg-transition-weight", type=float, default=defaults.reg_transition_weight,
                       help="add the paper's ||A - I||_F penalty with this weight (with any --reg-kind)")
    train.add_argument("--teacher", metavar="RUN", default=defaults.teacher,
                       help="distil: train against the predictions of the model in run folder RUN "
                            "(same task settings), with distillation_loss on the scored positions")
    train.add_argument("--distill-temperature", type=_positive_float, default=defaults.distill_temperature,
                       help="temperature of the softened distributions (with --teacher)")
    train.add_argument("--distill-weight", type=float, default=defaults.distill_weight,
                       help="loss = W * distillation + (1 - W) * cross-entropy (with --teacher; default 1)")
    train.add_argument("--checkpoint-every", type=_positive, default=defaults.checkpoint_every,
                       metavar="N", help="save RUN/checkpoint.pt every N steps and at the end "
                                         "(default: at every evaluation, i.e. every --log-every steps)")
    train.add_argument("--overwrite", action="store_true",
                       help="start again in a non-empty --out folder, replacing its run (default: refuse)")
    train.add_argument("--resume", metavar="RUN", default=None,
                       help="continue the run in folder RUN from its last checkpoint up to --steps "
                            "(default: start a new run); the config comes from the checkpoint, and "
                            f"only {', '.join(_RESUME_FLAGS)} may be given with --resume")


def _given_train_options(argv: Sequence[str]) -> set[str]:
    """The ``train`` options given on the command line ``argv`` (as argparse destinations)."""
    parser = _Parser(prog="ess-reg train")
    _add_train_arguments(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(list(argv)[1:])))


def _resumed_config(args: argparse.Namespace):
    """The config in the checkpoint of ``--resume RUN``, with the flags ``_RESUME_FLAGS`` applied."""
    from ess_reg.training import resume_config

    allowed = {flag[2:].replace("-", "_") for flag in _RESUME_FLAGS}
    extra = sorted(args.given - allowed - {"resume"})
    if extra:
        flags = ", ".join("--" + name.replace("_", "-") for name in extra)
        raise ValueError(f"--resume takes the run's config from its checkpoint; drop {flags} "
                         f"(allowed with --resume: {', '.join(_RESUME_FLAGS)})")
    changes = {name: getattr(args, name) for name in sorted(args.given & allowed - {"no_progress"})}
    return resume_config(args.resume, **changes)


def _train(args: argparse.Namespace) -> None:
    from ess_reg.training import TrainConfig, train

    if args.resume is not None:
        config = _resumed_config(args)
    else:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        values = {k: v for k, v in vars(args).items() if k in fields}
        if values["log_every"] is None:
            values["log_every"] = min(TrainConfig.log_every, max(1, values["steps"] // 10))
        config = TrainConfig(**values)
    last = train(config, progress=not args.no_progress, overwrite=args.overwrite,
                 resume=args.resume is not None)
    ess = ", ".join(f"{k} {v:.2f}" for k, v in last["ess"].items())
    print(f"done: step {last['step']}, test accuracy {last['test_accuracy']:.3f}, ESS {ess}")
    print(f"run folder: {Path(config.out).resolve()}")


def _analyze(args: argparse.Namespace) -> None:
    from ess_reg.analysis import format_reports, layer_report
    from ess_reg.training import load_run, make_task, save_curve_plot

    _plot_path(args.plot, Path.cwd(), "check.png")  # a bad --plot fails before the analysis runs
    if args.hf:
        _analyze_hf(args)
        return
    if args.run is None:
        raise ValueError("pass a run folder (or --hf CONFIG_OR_PATH)")
    model, config = load_run(args.run, args.device)
    task = make_task(config, args.examples, seed=args.seed)
    reports = layer_report(model, task.inputs.to(args.device), config, splits=args.splits)
    print(f"{config.mixer} on {config.task} (L={config.seq_len}), {args.examples} fresh examples")
    print(format_reports(reports))
    _note_sampled_splits(reports)
    run = Path(args.run)
    target = _plot_path(args.plot, run if run.is_dir() else run.parent, "analyze_ess_curves.png")
    path = save_curve_plot(reports, target, config.seq_len,
                           f"ESS on fresh inputs ({config.mixer}, {config.task})")
    print(f"curve plot: {path}")


def _plot_path(given: str | None, default_folder: Path, name: str) -> Path:
    """``--plot``: a file path (with an image suffix) or a folder to put ``name`` in (one that exists,
    a name without a suffix, or any name ending in ``/``)."""
    if given is None:
        return default_folder / name
    path = Path(given)
    folder = given.endswith(("/", os.sep)) or path.is_dir()
    if not folder and path.suffix.lower() in _IMAGE_SUFFIXES:
        return path
    if not folder and path.suffix:
        raise ValueError(f"--plot {given}: {path.suffix!r} is not an image type matplotlib writes; "
                         f"name a file ending in {', '.join(sorted(_IMAGE_SUFFIXES))}, or a folder "
                         f"(end it with '/': --plot {given}/)")
    return path / name


#: file types matplotlib writes without extra software
_IMAGE_SUFFIXES = frozenset({".png", ".pdf", ".svg", ".svgz", ".eps", ".ps", ".jpg", ".jpeg", ".tif",
                             ".tiff", ".webp", ".gif"})


def _note_sampled_splits(reports: list) -> None:
    from ess_reg.functional.ess import SAMPLED_DENSE_SPLITS

    sampled = [r.name for r in reports if r.sampled_by_default]
    if sampled:
        print(f"note: {', '.join(sampled)} took the O(L^4) dense route, so {SAMPLED_DENSE_SPLITS} "
              "evenly spaced splits stand in for all of them; pass --splits N to choose")


def _analyze_hf(args: argparse.Namespace) -> None:
    import os

    import torch

    from ess_reg.analysis import format_reports, layer_report
    from ess_reg.training import save_curve_plot
    from integrations.hf_models import load_local_model, tokenize

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_transformers()
    model, source = load_local_model(args.hf)
    if args.ids:
        try:
            ids = torch.tensor([[int(t) for t in args.ids.split(",")]])
        except ValueError:
            raise ValueError(f"--ids must be comma-separated integers, got {args.ids!r}") from None
        vocab = getattr(model.config, "vocab_size", None)
        outside = [int(t) for t in ids[0] if t < 0 or (vocab is not None and t >= vocab)]
        if outside:
            top = "?" if vocab is None else vocab - 1
            raise ValueError(f"--ids holds token ids outside the vocabulary 0 .. {top}: {outside[:5]}")
    elif args.text:
        ids = tokenize(args.hf, args.text)
    else:
        g = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(0, model.config.vocab_size, (args.examples, args.seq_len), generator=g)
    if ids.shape[-1] < 2:
        raise ValueError("the input needs at least 2 tokens")
    reports = layer_report(model.to(args.device), ids.to(args.device), splits=args.splits)
    print(f"{type(model).__name__} from {args.hf} ({source}), input {tuple(ids.shape)}")
    print(format_reports(reports))
    _note_sampled_splits(reports)
    if args.plot is None:
        print("curve plot: not saved (pass --plot PATH; nothing is written into the model folder)")
        return
    path = save_curve_plot(reports, _plot_path(args.plot, Path.cwd(), "ess_curves.png"), ids.shape[-1],
                           f"ESS of {type(model).__name__}")
    print(f"curve plot: {path}")


def _quiet_transformers() -> None:
    """transformers' load reports, progress bars and kernel-fallback notices stay out of the table."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the missing extra is reported by load_local_model
        return
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _showcase(args: argparse.Namespace) -> None:
    from ess_reg.showcase import format_table, run_showcase

    if args.seq_len < 2:
        raise ValueError("--seq-len must be at least 2")
    rows = run_showcase(args.seq_len, args.state, args.channels, args.seed, args.splits)
    print(f"ESS of random operators, L={args.seq_len}, N={args.state}, "
          f"{args.channels} channels (averages over splits and channels)")
    print(format_table(rows))


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command == "train":
        args.given = _given_train_options(argv)
    try:
        {"train": _train, "analyze": _analyze, "showcase": _showcase}[args.command](args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, OSError) as error:
        print(f"ess-reg: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
