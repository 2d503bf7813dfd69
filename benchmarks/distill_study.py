"""Higher teacher ESS, harder distillation? (the paper's Section 5.2, at CPU scale)

    python benchmarks/sweep.py run benchmarks/grids/distill_teachers.toml
    python benchmarks/sweep.py run benchmarks/grids/distill_students.toml
    python benchmarks/distill_study.py --figure docs/figures/distill_study.png

Prints, as markdown: the teachers (accuracy, total ESS, ESS per channel, the "needed state" of
``ess_reg.state_size_needed``); each student's accuracy and test KL from its teacher at every
student state size, beside a student of that size trained on the labels alone ("scratch");
Spearman's rho (bootstrap 95% interval over teachers) of teacher ESS against the student's KL and
against its retention (student accuracy / teacher accuracy) per student size; and the check of the
"needed state": retention of students at or above the teacher's needed state against those below.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ess_predicts import bootstrap_spearman, load_records, save_figure, stratified_spearman

REPO = Path(__file__).resolve().parents[1]
TEACHERS = REPO / "benchmarks" / "sweeps" / "distill_teachers.jsonl"
STUDENTS = REPO / "benchmarks" / "sweeps" / "distill_students.jsonl"


def teacher_rows(records: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per teacher run (``setting/cell/seedN``, the end of the run folder its students name): its
    accuracy, ESS and needed state."""
    rows = {}
    for r in records:
        metric, layers = r["metric"], r["layers"]
        rows[r["key"]] = {
            "key": r["key"], "kv": r["config"]["kv_pairs"], "cell": r["cell"], "accuracy": r["test_accuracy"],
            "ess": metric["ess/total"],
            "ess_per_channel": statistics.fmean(metric[f"{name}/ess"] for name in layers),
            "tss": max(size["tss"] for size in layers.values()),
            "needed": max(size["needed"] for size in layers.values())}
    return rows


def student_rows(records: Sequence[dict[str, Any]],
                 teachers: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per student: its size, accuracy, KL and teacher (None: trained from scratch)."""
    rows = []
    for r in records:
        teacher = r["config"].get("teacher")
        if teacher is not None:
            teacher = "/".join(Path(teacher).parts[-3:])  # the teacher's key in its grid
            if teacher not in teachers:
                raise ValueError(f"{r['key']}: its teacher {r['config']['teacher']} is not in the teachers' "
                                 "results; run the teachers' grid first")
        size = max(s["tss"] for s in r["layers"].values())
        rows.append({"key": r["key"], "kv": r["config"]["kv_pairs"], "size": size,
                     "accuracy": r["test_accuracy"], "kl": r.get("test_distill_kl"),
                     "teacher": None if teacher is None else teachers[teacher]})
    return rows


def report(teachers: dict[str, dict[str, Any]], students: Sequence[dict[str, Any]]) -> str:
    sizes = sorted({s["size"] for s in students})
    lines = ["Teachers:", "",
             "| teacher | kv | accuracy | total ESS | ESS/channel | TSS/channel | needed state |",
             "|---|---|---|---|---|---|---|"]
    for t in sorted(teachers.values(), key=lambda t: (t["kv"], t["cell"])):
        lines.append(f"| {t['key']} | {t['kv']} | {t['accuracy']:.3f} | {t['ess']:.1f} | "
                     f"{t['ess_per_channel']:.2f} | {t['tss']} | {t['needed']} |")
    lines += ["", "Students: test accuracy (test KL from the teacher, temperature 1) per student state size.",
              "", "| teacher | " + " | ".join(f"state {n}" for n in sizes) + " |",
              "|---|" + "---|" * len(sizes)]
    groups: dict[tuple[int, str], dict[int, dict[str, Any]]] = {}
    for s in students:
        name = "scratch" if s["teacher"] is None else s["teacher"]["key"]
        groups.setdefault((s["kv"], name), {})[s["size"]] = s
    for (_, name), by_size in sorted(groups.items()):
        cells = []
        for n in sizes:
            s = by_size.get(n)
            if s is None:
                cells.append("-")
            else:
                kl = "" if s["kl"] is None else f" ({s['kl']:.2f})"
                cells.append(f"{s['accuracy']:.3f}{kl}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    distilled = [s for s in students if s["teacher"] is not None]
    lines += ["", "Teacher ESS against the student's difficulty, per student size (Spearman rho, "
              "bootstrap 95% interval over teachers; retention = student accuracy / teacher accuracy). "
              "Harder tasks (more kv pairs) raise both the teacher's ESS and the student's difficulty, "
              "so the pooled rho mixes the two; the within-kv rho ranks teachers only against teachers "
              "of the same task:", "",
              "| student state | teachers | rho(ESS, KL) pooled | rho(ESS, KL) within kv | "
              "rho(ESS, retention) pooled | rho(ESS, retention) within kv |", "|---|---|---|---|---|---|"]
    for n in sizes:
        group = [s for s in distilled if s["size"] == n and s["teacher"]["accuracy"] > 0]
        if len(group) < 3:
            continue
        ess = [s["teacher"]["ess"] for s in group]
        kv = [s["kv"] for s in group]
        kl = [s["kl"] for s in group]
        retention = [s["accuracy"] / s["teacher"]["accuracy"] for s in group]
        cells = [bootstrap_spearman(ess, kl), stratified_spearman(ess, kl, kv),
                 bootstrap_spearman(ess, retention), stratified_spearman(ess, retention, kv)]
        lines.append(f"| {n} | {len(group)} | " + " | ".join(_fmt(*c) for c in cells) + " |")
    above = [s["accuracy"] / s["teacher"]["accuracy"] for s in distilled
             if s["teacher"]["accuracy"] > 0 and s["size"] >= s["teacher"]["needed"]]
    below = [s["accuracy"] / s["teacher"]["accuracy"] for s in distilled
             if s["teacher"]["accuracy"] > 0 and s["size"] < s["teacher"]["needed"] / 2]
    lines += ["", "The needed state: retention of students sized at or above their teacher's needed state, "
              "against students below half of it:", "",
              f"- at or above: {_summary(above)}", f"- below half: {_summary(below)}"]
    return "\n".join(lines)


def _fmt(value: float, ci: tuple[float, float]) -> str:
    if not math.isfinite(value):
        return "n/a"
    if not all(map(math.isfinite, ci)):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def _summary(values: Sequence[float]) -> str:
    if not values:
        return "no students"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return (f"{statistics.fmean(values):.2f} ± {sd:.2f} over {len(values)} students "
            f"(min {min(values):.2f}, max {max(values):.2f})")


def plot(students: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Student KL and retention against teacher ESS, one line per student size."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2)
    distilled = [s for s in students if s["teacher"] is not None]
    for i, n in enumerate(sorted({s["size"] for s in distilled})):
        group = sorted((s for s in distilled if s["size"] == n), key=lambda s: s["teacher"]["ess"])
        ess = [s["teacher"]["ess"] for s in group]
        axes[0].plot(ess, [s["kl"] for s in group], "o", color=f"C{i}", label=f"student state {n}")
        axes[1].plot(ess, [s["accuracy"] / max(s["teacher"]["accuracy"], 1e-9) for s in group], "o",
                     color=f"C{i}")
    axes[0].set_ylabel("student test KL from the teacher")
    axes[1].set_ylabel("retention (student / teacher accuracy)")
    for ax in axes:
        ax.set_xlabel("teacher total ESS")
        ax.grid(alpha=0.3)
    axes[0].legend()
    return save_figure(figure, path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teachers", default=str(TEACHERS), help="the teachers' JSONL results")
    parser.add_argument("--students", default=str(STUDENTS), help="the students' JSONL results")
    parser.add_argument("--figure", help="also save the figure here")
    args = parser.parse_args(argv)
    teachers = teacher_rows(load_records([args.teachers]))
    students = student_rows(load_records([args.students]), teachers)
    print(report(teachers, students))
    if args.figure:
        print(f"\nfigure: {plot(students, args.figure)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
