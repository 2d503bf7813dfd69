"""Appendix A at CPU scale: do the transition penalty and the entropy-ESS regularizer lift a
collapsing GLA / WLA on a hard MQAR setting?

    python benchmarks/exp_regularization.py run --mixer gla --out benchmarks/results/reg_gla.json
    python benchmarks/exp_regularization.py report benchmarks/results/reg_*.json

``run`` trains, for each seed, the same model without regularization, with the paper's
``lambda ||A - I||_F`` transition penalty and with the entropy-ESS regularizer (target "max"), and
records final test accuracy and ESS / TSS per layer. ``report`` writes the table and the plot.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ess_reg.training import TrainConfig, train

SETTING = dict(task="mqar", seq_len=64, kv_pairs=8, vocab_size=256, d_model=32, layers=2,
               steps=1000, batch_size=64, lr=3e-3, log_every=250, train_examples=20_000,
               test_examples=512)
CONDITIONS = {
    "none": dict(reg_weight=0.0),
    "transition (lambda=1)": dict(reg_weight=1.0, reg_kind="transition"),
    "entropy-ESS (w=0.5)": dict(reg_weight=0.5, reg_kind="entropy", reg_target="max"),
}


def run(mixer: str, seeds: list[int], out: Path) -> None:
    torch.set_num_threads(1)
    results = []
    for seed in seeds:
        for condition, extra in CONDITIONS.items():
            with tempfile.TemporaryDirectory() as folder:
                config = TrainConfig(mixer=mixer, seed=seed, out=folder, **SETTING, **extra)
                last = train(config, progress=False)
            state = SETTING["d_model"] * 0.5 / 4 if mixer == "gla" else SETTING["d_model"] / 4
            ess = list(last["ess"].values())
            results.append({"mixer": mixer, "seed": seed, "condition": condition,
                            "accuracy": last["test_accuracy"], "ess": ess,
                            "utilization": [e / state for e in ess]})
            print(json.dumps(results[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))


def report(paths: list[Path], markdown: Path, figure: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for p in paths for r in json.loads(p.read_text())]
    mixers = sorted({r["mixer"] for r in rows})
    lines = ["| mixer | condition | test accuracy (mean ± sd over seeds) | ESS/TSS layer 1 | "
             "ESS/TSS layer 2 | seeds |", "|---|---|---|---|---|---|"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mixer in mixers:
        for condition in CONDITIONS:
            group = [r for r in rows if r["mixer"] == mixer and r["condition"] == condition]
            if not group:
                continue
            acc = np.array([r["accuracy"] for r in group])
            util = np.array([r["utilization"] for r in group])
            lines.append(f"| {mixer} | {condition} | {acc.mean():.3f} ± {acc.std():.3f} | "
                         f"{util[:, 0].mean():.3f} | {util[:, 1].mean():.3f} | {len(group)} |")
            label = f"{mixer}: {condition}"
            axes[0].scatter(util.mean(1), acc, label=label)
    axes[0].set(xlabel="ESS / TSS (mean over layers)", ylabel="test accuracy",
                title="each point: one seed")
    axes[0].legend(fontsize=7)
    for k, mixer in enumerate(mixers):
        means = [np.mean([r["accuracy"] for r in rows if r["mixer"] == mixer and r["condition"] == c])
                 for c in CONDITIONS]
        axes[1].bar(np.arange(len(CONDITIONS)) + 0.4 * k, means, width=0.4, label=mixer)
    axes[1].set_xticks(np.arange(len(CONDITIONS)) + 0.2, list(CONDITIONS), fontsize=8)
    axes[1].set(ylabel="mean test accuracy", title="MQAR L=64, 8 kv pairs, d_model=32")
    axes[1].legend()
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=110)
    markdown.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mixer", default="gla")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("report")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--markdown", type=Path, default=Path("benchmarks/results/regularization_table.md"))
    p.add_argument("--figure", type=Path, default=Path("docs/figures/regularization.png"))
    args = parser.parse_args()
    if args.command == "run":
        run(args.mixer, args.seeds, args.out)
    else:
        report(args.paths, args.markdown, args.figure)


if __name__ == "__main__":
    main()
