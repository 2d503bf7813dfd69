"""Section 5.1 after training: ESS / TSS against TSS for the S6, GLA and GLA-S6 featurizations
(GLA-S6 at two normalization factors), at initialization and after MQAR training.

    python benchmarks/exp_trained_tss.py run --kind gla_s6_a16 --out benchmarks/results/tss_gla_s6_a16.json
    python benchmarks/exp_trained_tss.py report benchmarks/results/tss_*.json   # table + docs figure

Each run trains the default MQAR setting (as in exp_init_accuracy.py) with the default
initialization on one CPU thread and measures ESS / TSS (mean over the two layers, 16 test examples,
16 splits) on the same test examples before and after training.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from ess_reg import capture_operators
from ess_reg.functional import ess_summary
from ess_reg.training import TrainConfig, make_model, make_task, train

SETTING = dict(task="mqar", seq_len=64, kv_pairs=4, vocab_size=256, d_model=64, layers=2,
               steps=1000, batch_size=64, lr=3e-3, log_every=500, train_examples=20_000,
               test_examples=512)
STATES = (8, 16, 32)
KINDS = {
    "s6": ("s6", lambda n: {"d_state": n}),
    "gla": ("gla", lambda n: {"num_heads": 2, "expand_k": 2 * n / 64}),
    "gla_s6_a16": ("gla_s6", lambda n: {"d_state": n, "gate_logit_normalizer": 16.0}),
    "gla_s6_a1": ("gla_s6", lambda n: {"d_state": n, "gate_logit_normalizer": 1.0}),
}
LABELS = {"s6": "S6", "gla": "GLA", "gla_s6_a16": "GLA-S6, alpha = 16", "gla_s6_a1": "GLA-S6, alpha = 1"}


def utilization(model: torch.nn.Module, inputs: torch.Tensor) -> tuple[float, float]:
    """Mean ESS / TSS and mean ESS per channel over the layers."""
    model.eval()
    with torch.no_grad():
        ops = capture_operators(model, inputs)
    summaries = [ess_summary(op, splits=16) for op in ops.values()]
    return (sum(float(s["utilization"]) for s in summaries) / len(summaries),
            sum(float(s["ess"]) for s in summaries) / len(summaries))


def run(kind: str, states: list[int], out: Path, steps: int, seed: int, init: str = "none") -> None:
    torch.set_num_threads(1)
    mixer, kwargs = KINDS[kind]
    results = []
    for state in states:
        setting = dict(SETTING, steps=steps, log_every=min(steps, SETTING["log_every"]))
        with tempfile.TemporaryDirectory() as folder:
            config = TrainConfig(mixer=mixer, seed=seed, out=folder, mixer_kwargs=kwargs(state),
                                 init=init, **setting)
            torch.manual_seed(seed)  # the same model as train() builds (tasks use their own seeds)
            test = make_task(config, config.test_examples, seed=seed + 1_000_003).inputs[:16]
            init_util, init_ess = utilization(make_model(config), test)  # the default initialization
            last = train(config, progress=False)
            model = make_model(config)
            model.load_state_dict(torch.load(Path(folder) / "checkpoint.pt")["model"])
            util, ess = utilization(model, test)
        results.append({"kind": kind, "state": state, "seed": seed, "steps": steps, "init": init,
                        "accuracy": last["test_accuracy"], "init_utilization": init_util,
                        "init_ess": init_ess, "utilization": util, "ess": ess})
        print(json.dumps(results[-1]), flush=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))


def _mean(group: list[dict], key: str) -> float:
    return sum(r[key] for r in group) / len(group)


def report(paths: list[Path], figure: Path) -> None:
    """Table (means over seeds, per-seed accuracy) and figure of the runs in ``paths``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    everything = [r for p in paths for r in json.loads(p.read_text())]
    groups: dict[tuple, list[dict]] = {}
    for r in everything:
        groups.setdefault((r["kind"], r["state"], r.get("init", "none")), []).append(r)
    order = sorted(groups, key=lambda k: (k[2] != "none", list(KINDS).index(k[0]), k[1]))
    print("| featurization | TSS per channel | seeds | ESS/TSS at init | ESS/TSS trained | ESS trained | "
          "MQAR accuracy (per seed) |")
    print("|---|---|---|---|---|---|---|")
    for kind, state, init in order:
        group = sorted(groups[kind, state, init], key=lambda r: r["seed"])
        label = LABELS[kind] if init == "none" else (
            f"{LABELS[kind]}, ess_init({init}) before training (at-init column: before ess_init)")
        per_seed = ", ".join(f"{r['accuracy']:.3f}" for r in group)
        print(f"| {label} | {state} | {len(group)} | {_mean(group, 'init_utilization'):.3f} | "
              f"{_mean(group, 'utilization'):.3f} | {_mean(group, 'ess'):.2f} | "
              f"{_mean(group, 'accuracy'):.3f} ({per_seed}) |")
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for kind in KINDS:
        keys = [k for k in order if k[0] == kind and k[2] == "none"]
        if not keys:
            continue
        states = [k[1] for k in keys]
        mean = {key: [_mean(groups[k], key) for k in keys]
                for key in ("init_utilization", "utilization", "ess", "accuracy")}
        line = axes[0].plot(states, mean["init_utilization"], marker="o", ls="--",
                            label=f"{LABELS[kind]}: at init")
        axes[0].plot(states, mean["utilization"], marker="o", color=line[0].get_color(),
                     label=f"{LABELS[kind]}: trained")
        axes[1].plot(states, mean["ess"], marker="o", label=LABELS[kind])
        axes[2].plot(states, mean["accuracy"], marker="o", label=LABELS[kind])
    axes[0].set(ylabel="ESS / TSS", title="Utilization, at init (dashed) and trained")
    axes[1].set(ylabel="average ESS per channel", title="ESS after MQAR training")
    axes[2].set(ylabel="test accuracy", title="MQAR accuracy (mean over seeds)")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(STATES, [str(s) for s in STATES])
        ax.minorticks_off()
        ax.set_xlabel("TSS per channel (state size N)")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(figure, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--kind", choices=sorted(KINDS), required=True)
    r.add_argument("--states", type=int, nargs="+", default=list(STATES))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--steps", type=int, default=SETTING["steps"])
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--init", default="none", help="'none' (default init) or an ess_init scheme")
    p = sub.add_parser("report")
    p.add_argument("paths", type=Path, nargs="+")
    p.add_argument("--figure", type=Path, default=Path("docs/figures/trained_tss.png"))
    args = parser.parse_args()
    if args.command == "run":
        run(args.kind, args.states, args.out, args.steps, args.seed, args.init)
    else:
        report(args.paths, args.figure)


if __name__ == "__main__":
    main()
