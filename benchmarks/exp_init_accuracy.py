"""Section 5.1 after training: MQAR accuracy and ESS/TSS of default initialization versus
``ess_init(scheme="auto")`` for S6 and GLA, over seeds.

    python benchmarks/exp_init_accuracy.py run --mixer s6 --out benchmarks/results/init_s6.json
    python benchmarks/exp_init_accuracy.py report benchmarks/results/init_*.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ess_reg.training import TrainConfig, train

SETTING = dict(task="mqar", seq_len=64, kv_pairs=4, vocab_size=256, d_model=64, layers=2,
               steps=1000, batch_size=64, lr=3e-3, log_every=500, train_examples=20_000,
               test_examples=512)


def run(mixer: str, seeds: list[int], out: Path, steps: int) -> None:
    torch.set_num_threads(1)
    results = []
    for seed in seeds:
        for init in ("none", "auto"):
            with tempfile.TemporaryDirectory() as folder:
                setting = dict(SETTING, steps=steps, log_every=min(steps, SETTING["log_every"]))
                last = train(TrainConfig(mixer=mixer, seed=seed, init=init, out=folder, **setting),
                             progress=False)
            utilization = [v for k, v in last["metric"].items()
                           if k.endswith("/utilization") and not k.startswith("ess/")]
            results.append({"mixer": mixer, "seed": seed, "init": init, "steps": steps,
                            "accuracy": last["test_accuracy"], "utilization": utilization})
            print(json.dumps(results[-1]), flush=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1))


def report(paths: list[Path]) -> None:
    rows = [r for p in paths for r in json.loads(p.read_text())]
    print("| mixer | init | test accuracy (mean ± sd) | per seed | ESS/TSS after training (layers) |")
    print("|---|---|---|---|---|")
    for mixer in sorted({r["mixer"] for r in rows}):
        for init in ("none", "auto"):
            group = [r for r in rows if r["mixer"] == mixer and r["init"] == init]
            if not group:
                continue
            acc = np.array([r["accuracy"] for r in group])
            util = np.array([r["utilization"] for r in group]).mean(0)
            label = "default" if init == "none" else "ess_init(auto)"
            steps = group[0].get("steps", SETTING["steps"])
            print(f"| {mixer} ({steps} steps) | {label} | {acc.mean():.3f} ± {acc.std():.3f} | "
                  f"{', '.join(f'{a:.3f}' for a in acc)} | {', '.join(f'{u:.3f}' for u in util)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mixer", default="gla")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--steps", type=int, default=SETTING["steps"])
    p = sub.add_parser("report")
    p.add_argument("paths", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "run":
        run(args.mixer, args.seeds, args.out, args.steps)
    else:
        report(args.paths)


if __name__ == "__main__":
    main()
