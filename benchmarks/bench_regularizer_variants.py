"""Step-time overhead of each condition of the regularizer study, on its own settings.

Builds the model, task and penalty exactly as ``ess-reg train`` (and so ``benchmarks/sweep.py``)
does for each cell of a grid, and times training steps with every condition interleaved round by
round (best round kept), one thread. Prints seconds per step and the ratio to the unregularized
step, measured in this one run. Never run it while a sweep occupies the cores.

    python benchmarks/bench_regularizer_variants.py benchmarks/grids/regularizer_select.toml --setting a_gla
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sweep import load_grid

from ess_reg.tasks import loss_fn
from ess_reg.training import TrainConfig, make_model, make_penalty, make_task


def _stepper(config: TrainConfig):
    torch.manual_seed(config.seed)
    task = make_task(config, config.batch_size, seed=config.seed)
    model = make_model(config)
    penalty = make_penalty(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    x, y = task.inputs, task.targets

    def step() -> None:
        loss = loss_fn(model(x), y)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()  # warm-up
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("grid")
    parser.add_argument("--setting", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    grid = load_grid(args.grid, seeds=[0])
    runs = [r for r in grid.runs if r.setting == args.setting]
    if not runs:
        parser.error(f"no cell runs in setting {args.setting!r}")
    steppers = {r.cell: _stepper(TrainConfig(**{**r.config, "out": "unused"})) for r in runs}
    best = dict.fromkeys(steppers, float("inf"))
    for _ in range(args.rounds):
        for cell, step in steppers.items():
            start = time.perf_counter()
            for _ in range(args.repeats):
                step()
            best[cell] = min(best[cell], (time.perf_counter() - start) / args.repeats)
    base = best.get("none", min(best.values()))
    print(f"| cell ({args.setting}) | s per step | ratio to none |")
    print("|---|---|---|")
    for cell, seconds in best.items():
        print(f"| {cell} | {seconds:.3f} | {seconds / base:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
