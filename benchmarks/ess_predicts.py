"""Does ESS/kv predict accuracy better than TSS/kv? (the paper's Section 4, at CPU scale)

    python benchmarks/sweep.py run benchmarks/grids/ess_predicts_mqar.toml
    python benchmarks/ess_predicts.py benchmarks/sweeps/ess_predicts_mqar.jsonl \\
        --figure docs/figures/ess_predicts_mqar.png

Reads the sweep runner's records (each holds the trained model's ESS metric and its layers' sizes)
and prints, as markdown: one row per model, and Spearman's rho and Kendall's tau-b of accuracy
against ESS/kv and against TSS/kv, over all models and within each mixer, with bootstrap 95%
intervals over models and the paired bootstrap of the difference rho(ESS/kv) - rho(TSS/kv).

Conventions (stated in the output): ESS is the entropy-ESS averaged over splits, summed over the
channels of a layer and over the layers ("total"); TSS likewise sums channels x state per channel
over the layers; a softmax-attention layer, which has no finite state, counts the sequence length
per channel (its key-value cache). A "channel" is what carries one operator: a head for LA, WLA,
GLA and SA (whose state is key dimension x value dimension), one of ``d_inner`` channels for S6.
"kv" is the task's number of items to hold: MQAR's key-value pairs, selective copying's tokens to
copy. Two more conventions test that the conclusion does not hang on that choice: per channel
(mean over channels, summed over layers), and in floats (ESS and TSS times each channel's value
width, so TSS is the recurrent state's size and a GLA head of 32 x 32 counts like 64 S6 channels
of state 16).
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

BOOTSTRAP = 2000


def load_records(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """The records of the given JSONL files, a line cut off by a killed writer skipped, each run once."""
    records: dict[str, dict[str, Any]] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[f"{Path(path).stem}/{record['key']}"] = record
    return list(records.values())


def model_rows(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per trained model: mixer, setting, state, accuracy and the four ratios."""
    rows = []
    for r in records:
        config, metric, layers = r["config"], r.get("metric") or {}, r.get("layers")
        if not layers:
            raise ValueError(f"{r['key']}: the record has no layer sizes; it was written by an older "
                             "benchmarks/sweep.py (rerun that run)")
        items = config.get("copy_tokens") if config.get("task") == "selective_copying" else config.get(
            "kv_pairs")
        total_tss = mean_tss = mean_ess = float_tss = float_ess = 0.0
        for name, size in layers.items():
            per_channel = size["tss"] if size["tss"] is not None else config["seq_len"]
            width = size.get("value_width", 1)
            total_tss += per_channel * size["channels"]
            float_tss += per_channel * size["channels"] * width
            float_ess += metric[f"{name}/total_ess"] * width
            mean_tss += per_channel
            mean_ess += metric[f"{name}/ess"]
        rows.append({"key": r["key"], "mixer": config["mixer"], "setting": r["setting"], "cell": r["cell"],
                     "seed": r["seed"], "items": items, "accuracy": r["test_accuracy"],
                     "state": "/".join(str(s["tss"]) for s in layers.values()),
                     "ess_per_kv": metric["ess/total"] / items, "tss_per_kv": total_tss / items,
                     "channel_ess_per_kv": mean_ess / items, "channel_tss_per_kv": mean_tss / items,
                     "float_ess_per_kv": float_ess / items, "float_tss_per_kv": float_tss / items})
    return rows


def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks along the last axis, ties sharing their average rank."""
    order = np.argsort(values, axis=-1, kind="stable")
    ranked = np.empty(values.shape, dtype=float)
    np.put_along_axis(ranked, order, np.arange(values.shape[-1], dtype=float) + 1, axis=-1)
    out = np.empty_like(ranked)
    for index in np.ndindex(values.shape[:-1]):  # average the ranks of equal values
        row, r = values[index], ranked[index]
        _, inverse, counts = np.unique(row, return_inverse=True, return_counts=True)
        sums = np.bincount(inverse, weights=r)
        out[index] = (sums / counts)[inverse]
    return out


def spearman(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Spearman's rho along the last axis (nan where either side is constant)."""
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(-1, keepdims=True), ry - ry.mean(-1, keepdims=True)
    denominator = np.sqrt((rx ** 2).sum(-1) * (ry ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (rx * ry).sum(-1) / denominator, np.nan)


def kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b along the last axis (nan where either side is constant)."""
    dx = np.sign(x[..., :, None] - x[..., None, :])
    dy = np.sign(y[..., :, None] - y[..., None, :])
    concordance = (dx * dy).sum((-1, -2)) / 2
    pairs_x, pairs_y = (dx != 0).sum((-1, -2)) / 2, (dy != 0).sum((-1, -2)) / 2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs_x * pairs_y > 0, concordance / np.sqrt(pairs_x * pairs_y), np.nan)


def correlations(rows: Sequence[dict[str, Any]], ess_key: str, tss_key: str,
                 seed: int = 0) -> dict[str, Any]:
    """rho and tau of accuracy against ``ess_key`` and ``tss_key``, with bootstrap 95% intervals
    (models resampled with replacement) and the paired interval of rho_ESS - rho_TSS."""
    accuracy = np.array([r["accuracy"] for r in rows], dtype=float)
    ess = np.array([r[ess_key] for r in rows], dtype=float)
    tss = np.array([r[tss_key] for r in rows], dtype=float)
    sample = np.random.default_rng(seed).integers(0, len(rows), (BOOTSTRAP, len(rows)))
    out: dict[str, Any] = {"n": len(rows)}
    for name, fn in (("rho", spearman), ("tau", kendall)):
        point_ess, point_tss = float(fn(ess, accuracy)), float(fn(tss, accuracy))
        boot_ess, boot_tss = fn(ess[sample], accuracy[sample]), fn(tss[sample], accuracy[sample])
        out[f"{name}_ess"], out[f"{name}_tss"] = point_ess, point_tss
        out[f"{name}_ess_ci"], out[f"{name}_tss_ci"] = _interval(boot_ess), _interval(boot_tss)
        out[f"{name}_diff"], out[f"{name}_diff_ci"] = point_ess - point_tss, _interval(boot_ess - boot_tss)
    return out


def bootstrap_spearman(x: Sequence[float], y: Sequence[float],
                       seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Spearman's rho of ``x`` and ``y`` and its bootstrap 95% interval (pairs resampled)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    sample = np.random.default_rng(seed).integers(0, len(x), (BOOTSTRAP, len(x)))
    return float(spearman(x, y)), _interval(spearman(x[sample], y[sample]))


def stratified_spearman(x: Sequence[float], y: Sequence[float], groups: Sequence[Any],
                        seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Spearman's rho within groups, pooled: ranks taken inside each group and centred there, then
    correlated over all items, so a trait shared by a whole group (a harder task raising both
    quantities) cannot make the correlation; bootstrap 95% interval resampling within groups."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    members = [np.flatnonzero(np.asarray([g == k for g in groups])) for k in dict.fromkeys(groups)]
    rng = np.random.default_rng(seed)

    def rho(picks: list[np.ndarray]) -> float:
        rx, ry = [], []
        for pick in picks:
            if pick.size < 2:
                continue
            for values, out in ((x[pick], rx), (y[pick], ry)):
                r = ranks(values)
                out.append(r - r.mean())
        if not rx:
            return math.nan
        rx_all, ry_all = np.concatenate(rx), np.concatenate(ry)
        denominator = math.sqrt(float((rx_all ** 2).sum() * (ry_all ** 2).sum()))
        return float((rx_all * ry_all).sum() / denominator) if denominator > 0 else math.nan

    point = rho(members)
    boot = np.array([rho([rng.choice(m, m.size) for m in members]) for _ in range(BOOTSTRAP)])
    return point, _interval(boot)


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if finite.size < 0.9 * values.size:  # too many resamples without a defined coefficient
        return (math.nan, math.nan)
    low, high = np.percentile(finite, [2.5, 97.5])
    return (float(low), float(high))


def _fmt(value: float, ci: tuple[float, float] | None = None) -> str:
    if not math.isfinite(value):
        return "n/a"
    if ci is None or not all(map(math.isfinite, ci)):
        return f"{value:+.2f}"
    return f"{value:+.2f} [{ci[0]:+.2f}, {ci[1]:+.2f}]"


def report(rows: Sequence[dict[str, Any]]) -> str:
    """The markdown tables: models, then correlations for both conventions."""
    lines = ["| model | kv | state/ch | accuracy | ESS/kv | TSS/kv | ESS/kv per ch | TSS/kv per ch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["mixer"], r["items"], r["key"])):
        lines.append(f"| {r['key']} | {r['items']} | {r['state']} | {r['accuracy']:.3f} | "
                     f"{r['ess_per_kv']:.2f} | {r['tss_per_kv']:.1f} | {r['channel_ess_per_kv']:.2f} | "
                     f"{r['channel_tss_per_kv']:.1f} |")
    groups = {"all models": list(rows)}
    for mixer in sorted({r["mixer"] for r in rows}):
        groups[mixer] = [r for r in rows if r["mixer"] == mixer]
    for title, (ess_key, tss_key) in {
            "total (summed over channels and layers)": ("ess_per_kv", "tss_per_kv"),
            "per channel (mean over channels, summed over layers)": ("channel_ess_per_kv",
                                                                     "channel_tss_per_kv"),
            "in floats (each channel's ESS and TSS times the values it carries: a head's value "
            "dimension for LA/WLA/GLA/SA, 1 for S6; TSS is then the recurrent state's size)": (
                "float_ess_per_kv", "float_tss_per_kv")}.items():
        lines += ["", f"Convention: {title}. 95% bootstrap intervals over models ({BOOTSTRAP} resamples).",
                  "", "| models | n | rho ESS/kv | rho TSS/kv | rho diff | tau ESS/kv | tau TSS/kv "
                  "| tau diff |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, group in groups.items():
            if len(group) < 3:
                continue
            c = correlations(group, ess_key, tss_key)
            lines.append(f"| {name} | {c['n']} | {_fmt(c['rho_ess'], c['rho_ess_ci'])} | "
                         f"{_fmt(c['rho_tss'], c['rho_tss_ci'])} | {_fmt(c['rho_diff'], c['rho_diff_ci'])} | "
                         f"{_fmt(c['tau_ess'], c['tau_ess_ci'])} | {_fmt(c['tau_tss'], c['tau_tss_ci'])} | "
                         f"{_fmt(c['tau_diff'], c['tau_diff_ci'])} |")
    return "\n".join(lines)


def plot(rows: Sequence[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Accuracy against ESS/kv and against TSS/kv (log axes), one colour per mixer."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    axes = figure.subplots(1, 2, sharey=True)
    mixers = sorted({r["mixer"] for r in rows})
    colours = {m: f"C{i}" for i, m in enumerate(mixers)}
    panels = ((axes[0], "ess_per_kv", "ESS / kv (total)"), (axes[1], "tss_per_kv", "TSS / kv (total)"))
    for ax, key, label in panels:
        for mixer in mixers:
            group = [r for r in rows if r["mixer"] == mixer]
            ax.scatter([r[key] for r in group], [r["accuracy"] for r in group], label=mixer,
                       color=colours[mixer], alpha=0.8)
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(title="mixer")
    figure.suptitle(title)
    return save_figure(figure, path)


def save_figure(figure: Any, path: str | Path) -> Path:
    """Write a matplotlib ``Figure`` to ``path`` (folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="JSONL files written by benchmarks/sweep.py")
    parser.add_argument("--figure", help="also save the scatter figure here")
    parser.add_argument("--title", default="Accuracy against ESS/kv and TSS/kv")
    args = parser.parse_args(argv)
    rows = model_rows(load_records(args.results))
    print(report(rows))
    if args.figure:
        print(f"\nfigure: {plot(rows, args.figure, args.title)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
