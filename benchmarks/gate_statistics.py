"""What a trained model's gates do: per layer, the decay statistics and the ESS of its operators.

    python benchmarks/gate_statistics.py runs/sweeps/regularizer_report_b/b_gla_s6_alpha1/none/seed4 ...

For each run folder (``ess-reg train`` / ``benchmarks/sweep.py`` output): the mean per-step decay
``exp(log_decay)`` over batch, channels, positions and state, the median log-decay, the share of
decays above 0.9 (a state that survives ten steps keeps a third of itself), and the entropy- and
tolerance-ESS per channel over 16 evenly spaced splits, on ``--examples`` fresh test sequences.
Prints one Markdown table. Layers without a state transition (attention) show "-".
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ess_reg import capture_operators
from ess_reg.functional import entropy_ess, split_spectrum, tolerance_ess
from ess_reg.training import load_run, make_task


def gate_statistics(folder: str, examples: int = 32, seed: int = 123) -> dict[str, dict[str, float | None]]:
    """``{layer: {mean_decay, median_log_decay, share_above_0_9, entropy_ess, tolerance_ess}}``."""
    model, config = load_run(folder, "cpu")
    task = make_task(config, examples, seed=seed)
    model.eval()
    with torch.no_grad():
        operators = capture_operators(model, task.inputs)
    out = {}
    for name, op in operators.items():
        sigma = split_spectrum(op, splits=16).values
        log_decay = getattr(op, "log_decay", None)
        decay = None if log_decay is None else log_decay.double().real.exp()
        out[name] = {
            "mean_decay": None if decay is None else float(decay.mean()),
            "median_log_decay": None if decay is None else float(log_decay.double().real.median()),
            "share_above_0_9": None if decay is None else float((decay > 0.9).double().mean()),
            "entropy_ess": float(entropy_ess(sigma).mean()),
            "tolerance_ess": float(tolerance_ess(sigma).mean()),
        }
    return out


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--examples", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| run | layer | mean decay | median log-decay | decays > 0.9 | entropy-ESS | tolerance-ESS |")
    print("|---|---|---|---|---|---|---|")
    for folder in args.folders:
        label = "/".join(Path(folder).parts[-2:])
        for layer, s in gate_statistics(folder, args.examples).items():
            print(f"| {label} | {layer} | {_fmt(s['mean_decay'], 3)} | {_fmt(s['median_log_decay'], 2)} | "
                  f"{_fmt(s['share_above_0_9'], 2)} | {s['entropy_ess']:.2f} | {s['tolerance_ess']:.2f} |")


if __name__ == "__main__":
    main()
