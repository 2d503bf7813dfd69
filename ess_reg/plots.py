"""Plots of training runs and ESS curves (matplotlib, written as PNG)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

# Figures are built with the object-oriented API and saved through Agg: importing this module never
# touches pyplot or the user's matplotlib backend.


def plot_training(records: Sequence[Mapping], path: str | Path) -> Path:
    """Accuracy and average ESS per layer against the step, from ``metrics.jsonl`` records."""
    evals = [r for r in records if "test_accuracy" in r]
    fig = Figure(figsize=(11, 4))
    left, right = fig.subplots(1, 2)
    steps = [r["step"] for r in evals]
    left.plot(steps, [r["test_accuracy"] for r in evals], marker="o", label="test")
    if any("train_accuracy" in r for r in evals):
        left.plot(steps, [r.get("train_accuracy", np.nan) for r in evals], alpha=0.6, label="train")
    left.set(xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02), title="accuracy")
    left.legend()
    layers = sorted({k for r in evals for k in r.get("ess", {})})
    for layer in layers:
        right.plot(steps, [r.get("ess", {}).get(layer, np.nan) for r in evals], marker="o", label=layer)
    right.set(xlabel="step", ylabel="average entropy-ESS per channel", title="ESS per layer")
    if layers:
        right.legend(fontsize=8)
    return _save(fig, path)


def plot_ess_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
    path: str | Path,
    *,
    seq_len: int | None = None,
    state_size: int | None = None,
    title: str = "ESS over the sequence",
) -> Path:
    """One line per layer: mean ESS at each split index.

    Also draws the edge bound ``min(i, L - i)`` (every operator's ESS falls to 1 at the end of the
    sequence) and the state size ``N`` when given; the y-axis stops a little above the data.
    """
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    top = max((float(np.max(v)) for _, v in curves.values()), default=1.0)
    for layer, (splits, values) in curves.items():
        ax.plot(splits, values, label=layer)
    if seq_len is not None:
        i = np.arange(1, seq_len)
        ax.plot(i, np.minimum(i, seq_len - i), "k:", lw=0.8, label="edge bound min(i, L-i)")
    if state_size is not None:
        ax.axhline(state_size, color="grey", ls="--", lw=0.8, label=f"state size N = {state_size}")
        top = max(top, state_size)
    ax.set_ylim(0, 1.15 * top)
    ax.set(xlabel="split index i", ylabel="entropy-ESS (mean over channels)", title=title)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
