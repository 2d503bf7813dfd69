"""One resumable runner for every training sweep: a grid file in, one JSON line per finished run out.

    python benchmarks/sweep.py run benchmarks/grids/regularizer_select.toml   # both cores, resumable
    python benchmarks/sweep.py run GRID_A GRID_B --workers 2   # several grids from one queue, in order
    python benchmarks/sweep.py status benchmarks/grids/regularizer_select.toml
    python benchmarks/sweep.py report benchmarks/grids/regularizer_select.toml --reference none

A grid (TOML) names ``settings`` and ``cells`` (each a table of ``ess_reg.training.TrainConfig``
overrides, applied over ``[base]``: setting first, then cell) and the ``seeds``; every
(setting, cell, seed) is one run of ``ess_reg.training.train``, in its own process with one thread,
``workers`` (default 2) at a time; a run that fails or crashes is reported at the end and the others
go on. Each finished run appends one line to the grid's ``results``
file (JSONL, written by this process only); a restart skips the runs already there, and a run that
was interrupted continues from its own ``checkpoint.pt``. A cell may list ``settings = [...]`` to
run only there.

A grid whose run folders others load (a distillation study's teachers) sets ``runs_dir`` to a
tracked folder and ``keep_models = true``: each finished run's ``checkpoint.pt`` is then cut to the
trained model, its config and its step (no optimizer state, about a third of the size), and the
runner's own files and the run's figures are removed (``metrics.jsonl`` keeps the curves), so the
folders can be committed and outlive the machine.

``report`` prints, per setting and cell, mean ± sd of the final test accuracy and of the mean
utilization over layers, the per-seed values, and the paired difference (same seed) against the
``--reference`` cells. Seeds used to choose hyper-parameters belong in one grid, the seeds that are
reported in another, so a reported number never comes from a selection seed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class Run:
    setting: str
    cell: str
    seed: int
    config: dict[str, Any]

    @property
    def key(self) -> str:
        return f"{self.setting}/{self.cell}/seed{self.seed}"


@dataclasses.dataclass
class Grid:
    name: str
    results: Path
    runs_dir: Path
    runs: list[Run]
    keep_models: bool = False  # finished runs keep a model-only checkpoint and no runner files

    def done(self) -> dict[str, dict[str, Any]]:
        """Finished runs by key, from the results file."""
        if not self.results.exists():
            return {}
        out = {}
        for number, line in enumerate(self.results.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a killed writer: that run runs again
                print(f"warning: {self.results}:{number} is not a complete JSON record; ignored",
                      file=sys.stderr)
                continue
            if "key" in record and "error" not in record:
                out[record["key"]] = record
        return out


def load_grid(path: str | Path, seeds: Iterable[int] | None = None) -> Grid:
    """Read a grid file; ``seeds`` replaces the file's seeds."""
    from ess_reg.training import TrainConfig, _validate

    path = Path(path)
    spec = tomllib.loads(path.read_text())
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    base = spec.get("base", {})
    settings = spec.get("settings") or {"default": {}}
    cells = spec.get("cells") or {"default": {}}
    seeds = list(spec.get("seeds", [0]) if seeds is None else seeds)
    runs = []
    for setting, setting_overrides in settings.items():
        for cell, cell_overrides in cells.items():
            cell_overrides = dict(cell_overrides)
            only = cell_overrides.pop("settings", None)
            if only is not None:
                if not isinstance(only, list) or not set(only) <= set(settings):
                    raise ValueError(f"{path}: cell {cell!r}: settings must be a list of setting names "
                                     f"from {sorted(settings)}, got {only!r}")
                if setting not in only:
                    continue
            config = {**base, **setting_overrides, **cell_overrides}
            unknown = sorted(set(config) - fields)
            if unknown:
                raise ValueError(f"{path}: setting {setting!r}, cell {cell!r}: unknown TrainConfig "
                                 f"fields {unknown}")
            try:  # a bad cell fails here, not hours into the sweep
                _validate(TrainConfig(**config))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{path}: setting {setting!r}, cell {cell!r}: {error}") from None
            runs += [Run(setting, cell, seed, {**config, "seed": seed}) for seed in seeds]
    name = spec.get("name", path.stem)
    results = _resolve(spec.get("results", f"benchmarks/sweeps/{name}.jsonl"))  # tracked
    runs_dir = _resolve(spec.get("runs_dir", f"runs/sweeps/{name}"))  # ignored by git
    keep_models = spec.get("keep_models", False)
    if not isinstance(keep_models, bool):
        raise ValueError(f"{path}: keep_models must be true or false, got {keep_models!r}")
    return Grid(name, results, runs_dir, runs, keep_models)


def _resolve(text: str) -> Path:
    path = Path(text)
    return path if path.is_absolute() else REPO / path


def run_grid(grid: Grid, workers: int = 2, *, echo: bool = True) -> list[dict[str, Any]]:
    """Run every run of ``grid`` not yet in its results file; returns the new records."""
    return run_grids([grid], workers, echo=echo)


def run_grids(grids: list[Grid], workers: int = 2, *, echo: bool = True) -> list[dict[str, Any]]:
    """Run every run of ``grids`` not yet in its grid's results file, in order, from one queue:
    ``workers`` processes stay busy across the grids (a slow grid's last run does not leave a core
    idle while the next grid waits). Returns the new records."""
    todo: list[tuple[Grid, Run]] = []
    for grid in grids:
        done = grid.done()
        pending = [run for run in grid.runs if run.key not in done]
        todo += [(grid, run) for run in pending]
        if echo:
            print(f"{grid.name}: {len(grid.runs)} runs, {len(done)} done, {len(pending)} to run "
                  f"({workers} at a time)", flush=True)
        grid.results.parent.mkdir(parents=True, exist_ok=True)
        if grid.results.exists() and grid.results.stat().st_size:
            with grid.results.open("rb+") as fh:  # never append onto a line a killed writer cut off
                fh.seek(-1, os.SEEK_END)
                if fh.read(1) != b"\n":
                    fh.write(b"\n")
    new: list[dict[str, Any]] = []
    failed: dict[str, str] = {}
    queue, running = list(todo), {}
    while queue or running:
        while queue and len(running) < workers:  # one process per run: a crash costs one run only
            grid, run = queue.pop(0)
            running[(grid.name, run.key)] = (grid, _start(run, grid.runs_dir / run.key, grid.keep_models))
        time.sleep(0.2)
        for slot, (grid, (process, record_path, log_path)) in list(running.items()):
            if process.poll() is None:
                continue
            del running[slot]
            key = f"{grid.name}: {slot[1]}" if len(grids) > 1 else slot[1]
            if process.returncode != 0 or not record_path.exists():
                lines = log_path.read_text(errors="replace").strip().splitlines() if log_path.exists() else []
                tail = lines[-1:]
                failed[key] = f"exit code {process.returncode}: {' '.join(tail)} (log: {log_path})"
                print(f"  {key}: FAILED {failed[key]}", flush=True)
                continue
            record = json.loads(record_path.read_text())
            record_path.unlink()
            with grid.results.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            if grid.keep_models:  # recorded: the runner's files and the figures are not kept
                for path in [record_path.parent / "sweep_run.json", record_path.parent / "sweep.log",
                             *record_path.parent.glob("*.png")]:
                    path.unlink(missing_ok=True)
            new.append(record)
            if echo:
                print(f"  {key}: accuracy {record['test_accuracy']:.3f}, utilization "
                      f"{record['utilization']:.3f}, {record['seconds']:.0f} s", flush=True)
    if failed:
        raise RuntimeError(f"{len(failed)} run(s) failed (the others are recorded): "
                           + "; ".join(f"{k}: {v}" for k, v in failed.items()))
    return new


def _start(run: Run, folder: Path, keep_model: bool = False) -> tuple[subprocess.Popen, Path, Path]:
    """Launch ``train_one`` for ``run`` in a fresh Python with one thread; its record goes to a file."""
    folder.mkdir(parents=True, exist_ok=True)
    spec, record, log = folder / "sweep_run.json", folder / "sweep_record.json", folder / "sweep.log"
    record.unlink(missing_ok=True)
    spec.write_text(json.dumps({**dataclasses.asdict(run), "keep_model": keep_model}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with log.open("w") as fh:
        process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_one", str(spec)],
                                   stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    return process, record, log


def train_one(run: Run, folder: str, keep_model: bool = False) -> dict[str, Any]:
    """Train one run (continuing its checkpoint if one exists) and summarise it; with
    ``keep_model``, cut its checkpoint to the model once trained (see :func:`keep_model_only`)."""
    import torch

    from ess_reg.training import TrainConfig, resume_config, train

    torch.set_num_threads(1)
    start = time.perf_counter()
    checkpoint = Path(folder) / "checkpoint.pt"
    config = TrainConfig(**{**run.config, "out": folder})
    resumed = False
    if checkpoint.exists():
        try:
            saved = resume_config(folder)
        except ValueError:  # not a checkpoint this code can continue
            saved = None
        if saved is not None and same_run(dataclasses.replace(saved, out=folder), config) and \
                _resumable(checkpoint):  # interrupted
            config, resumed = saved, True
        else:
            print(f"  {run.key}: the grid changed since its checkpoint; starting it again", flush=True)
    last = train(config, progress=False, overwrite=not resumed, resume=resumed)
    sizes = layer_sizes(folder, config)
    if keep_model:
        keep_model_only(checkpoint)
    metric = last.get("metric", {})
    utilization = {k[: -len("/utilization")]: v for k, v in metric.items() if k.endswith("/utilization")}
    return {"key": run.key, "setting": run.setting, "cell": run.cell, "seed": run.seed,
            "config": run.config, "test_accuracy": last["test_accuracy"],
            "train_accuracy": last.get("train_accuracy"),
            "utilization": sum(utilization.values()) / max(1, len(utilization)),
            "layer_utilization": utilization, "ess": last.get("ess", {}),
            "reg_loss": last.get("reg_loss"), "loss": last.get("loss"),
            "seconds": time.perf_counter() - start, "resumed": resumed,
            "train_seconds": last.get("elapsed_s"), "metric": metric, "layers": sizes,
            **({"test_distill_kl": last["test_distill_kl"]} if "test_distill_kl" in last else {})}


#: What a model-only checkpoint keeps: enough for ``load_run`` and a student's ``load_teacher``.
MODEL_ONLY = ("model", "train_config", "step", "elapsed_s")


def keep_model_only(checkpoint: Path) -> None:
    """Rewrite a finished run's ``checkpoint.pt`` with the trained model, its config and its step
    only (no optimizer, scheduler or random state): it still loads as a run (``load_run``, a
    teacher), but no longer resumes."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    slim = {key: state[key] for key in MODEL_ONLY if key in state}
    tmp = checkpoint.with_suffix(".tmp")
    torch.save(slim, tmp)
    os.replace(tmp, checkpoint)


def _resumable(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` holds a training state (a model-only one does not)."""
    import torch

    return "optimizer" in torch.load(checkpoint, map_location="cpu", weights_only=True)


def same_run(a: Any, b: Any) -> bool:
    """Whether two configs train the same run: equal, up to options of an ESS regularizer that
    neither has (``reg_max_operators`` means nothing without one)."""
    def effective(config: Any) -> dict[str, Any]:
        fields = dataclasses.asdict(config)
        if not (config.reg_weight > 0 and config.reg_kind != "transition"):
            fields.pop("reg_max_operators", None)
        return fields

    return effective(a) == effective(b)


def layer_sizes(folder: str, config: Any) -> dict[str, dict[str, Any]]:
    """Per layer of the trained model in ``folder``: ``channels``, ``tss`` per channel (None without a
    finite state), ``value_width`` (the values each channel's operator carries: a head's value
    dimension for LA/WLA/GLA/SA, 1 for channel-wise SSMs; ``channels x tss x value_width`` is the
    layer's recurrent state in floats) and ``needed``, ``ess_reg.state_size_needed``'s state at its
    defaults, all on the first ``config.ess_examples`` test examples (those its ESS was measured on)."""
    import torch

    from ess_reg import capture_operators, theoretical_state_size
    from ess_reg.sizing import operator_state_needed
    from ess_reg.training import load_run, make_test_task

    model, _ = load_run(folder)
    with torch.no_grad():
        operators = capture_operators(model, make_test_task(config).inputs[: config.ess_examples])
    modules = dict(model.named_modules())
    return {name: {"channels": op.num_channels, "tss": theoretical_state_size(op),
                   "value_width": _value_width(modules[name]), "needed": operator_state_needed(op)}
            for name, op in operators.items()}


def _value_width(module: Any) -> int:
    for attribute in ("value_dim", "head_dim", "headdim"):
        if isinstance(getattr(module, attribute, None), int):
            return getattr(module, attribute)
    heads, width = getattr(module, "num_heads", None), getattr(module, "d_model", None)
    if isinstance(heads, int) and isinstance(width, int):
        return width // heads
    return 1


# -- report -------------------------------------------------------------------------------------
def summarize(records: list[dict[str, Any]], references: list[str]) -> str:
    """A markdown table per setting: mean ± sd, per-seed values, paired differences."""
    lines = []
    settings = sorted({r["setting"] for r in records})
    for setting in settings:
        rows = [r for r in records if r["setting"] == setting]
        cells = list(dict.fromkeys(r["cell"] for r in rows))
        by = {(r["cell"], r["seed"]): r for r in rows}
        lines += [f"### {setting}", ""]
        header = "| cell | accuracy mean ± sd | per seed | utilization mean ± sd |"
        rule = "|---|---|---|---|"
        for ref in references:
            header += f" paired diff vs {ref} (mean ± sd, wins) |"
            rule += "---|"
        lines += [header, rule]
        for cell in cells:
            seeds = sorted(s for (c, s) in by if c == cell)
            acc = [by[(cell, s)]["test_accuracy"] for s in seeds]
            util = [by[(cell, s)]["utilization"] for s in seeds]
            line = (f"| {cell} | {_mean_sd(acc)} | {', '.join(f'{a:.3f}' for a in acc)} | "
                    f"{_mean_sd(util)} |")
            for ref in references:
                paired = [by[(cell, s)]["test_accuracy"] - by[(ref, s)]["test_accuracy"]
                          for s in seeds if (ref, s) in by]
                wins = sum(d > 0 for d in paired)
                note = "" if len(paired) == len(seeds) else f" (over {len(paired)} shared seeds)"
                cell_text = f" {_mean_sd(paired, signed=True)}, {wins}/{len(paired)}{note} |"
                line += cell_text if paired else " - |"
            lines.append(line)
        lines.append("")
    return "\n".join(lines)


def plot_report(records: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """One panel per setting: test accuracy against utilization, every run as a small point and
    each cell's mean ± sd (both axes) as a large one, coloured by cell; written as PNG."""
    from matplotlib.figure import Figure

    settings = sorted({r["setting"] for r in records})
    figure = Figure(figsize=(5.5 * len(settings), 4.2), layout="constrained")
    axes = figure.subplots(1, len(settings), squeeze=False)[0]
    for ax, setting in zip(axes, settings, strict=True):
        rows = [r for r in records if r["setting"] == setting]
        for k, cell in enumerate(dict.fromkeys(r["cell"] for r in rows)):
            mine = [r for r in rows if r["cell"] == cell]
            util = [r["utilization"] for r in mine]
            acc = [r["test_accuracy"] for r in mine]
            colour = f"C{k % 10}"
            ax.scatter(util, acc, s=14, alpha=0.45, color=colour)
            ax.errorbar(_mean(util), _mean(acc), xerr=_sd(util), yerr=_sd(acc), fmt="o", ms=7, capsize=3,
                        color=colour, label=f"{cell} (n={len(mine)})")
        ax.set(xlabel="utilization (ESS / TSS, mean over layers)", ylabel="test accuracy", title=setting)
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    if title:
        figure.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _sd(values: list[float]) -> float:
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _mean_sd(values: list[float], signed: bool = False) -> str:
    if not values:
        return "-"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return f"{mean:+.3f} ± {sd:.3f}" if signed else f"{mean:.3f} ± {sd:.3f}"


def _one(spec_path: str) -> int:
    """Child process: train one run described by ``spec_path`` and write its record beside it."""
    spec = json.loads(Path(spec_path).read_text())
    run = Run(spec["setting"], spec["cell"], spec["seed"], spec["config"])
    folder = Path(spec_path).parent
    record = train_one(run, str(folder), keep_model=spec.get("keep_model", False))
    tmp = folder / "sweep_record.json.tmp"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / "sweep_record.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_one"]:
        return _one(argv[1])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "status", "report"):
        p = sub.add_parser(name)
        if name == "run":
            p.add_argument("grid", nargs="+", help="grid files, run in order from one queue")
        else:
            p.add_argument("grid")
        p.add_argument("--seeds", default=None, help="comma-separated seeds replacing the grid's")
        if name == "run":
            p.add_argument("--workers", type=int, default=2)
        if name == "report":
            p.add_argument("--reference", action="append", default=[],
                           help="cell to pair against (repeatable)")
            p.add_argument("--figure", default=None,
                           help="also save accuracy against utilization per run and cell here (PNG)")
    args = parser.parse_args(argv)
    seeds = None if args.seeds is None else [int(s) for s in args.seeds.split(",")]
    if args.command == "run":
        run_grids([load_grid(path, seeds) for path in args.grid], args.workers)
        return 0
    grid = load_grid(args.grid, seeds)
    if args.command == "status":
        done = grid.done()
        missing = [r.key for r in grid.runs if r.key not in done]
        print(f"{grid.name}: {len(grid.runs) - len(missing)}/{len(grid.runs)} done")
        for key in missing:
            print(f"  to run: {key}")
    else:
        wanted = {r.key for r in grid.runs}
        records = [r for k, r in grid.done().items() if k in wanted]
        cells = {r.cell for r in grid.runs}
        unknown = [ref for ref in args.reference if ref not in cells]
        if unknown:
            parser.error(f"--reference {', '.join(unknown)}: not a cell of the grid ({sorted(cells)})")
        print(summarize(records, args.reference))
        if args.figure and records:
            print(f"figure: {plot_report(records, args.figure, title=grid.name)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
