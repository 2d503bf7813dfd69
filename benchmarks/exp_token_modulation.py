"""Paper section 6 at CPU scale: how much do softmax and linear attention modulate ESS around a
delimiter? Trains both on two independent MQAR segments separated by a delimiter token, then
aligns ESS on the delimiter with ``ess_reg.analysis.ess_around_tokens``.

    python benchmarks/exp_token_modulation.py      # table on stdout, plot in docs/figures
"""

from __future__ import annotations

import numpy as np
import torch

from ess_reg.analysis import ess_around_tokens
from ess_reg.models import SequenceModel
from ess_reg.tasks import IGNORE_INDEX, MQAR, accuracy, loss_fn

LENGTH, KV, VOCAB = 64, 4, 128
SEPARATOR = VOCAB  # one extra token id
FIRST_LENGTHS = (20, 24, 28, 32, 36, 40)


def segmented(num_examples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two MQAR segments (keys/values drawn independently) joined by the separator, length 64."""
    g = np.random.default_rng(seed)
    inputs = torch.zeros(num_examples, LENGTH, dtype=torch.long)
    targets = torch.full((num_examples, LENGTH), IGNORE_INDEX, dtype=torch.long)
    for row in range(num_examples):
        first = int(g.choice(FIRST_LENGTHS))
        second = LENGTH - 2 - first
        a = MQAR(1, first, KV, VOCAB, seed=int(g.integers(2**31)))
        b = MQAR(1, second, KV, VOCAB, seed=int(g.integers(2**31)))
        inputs[row, :first], targets[row, :first] = a.inputs[0], a.targets[0]
        inputs[row, first] = SEPARATOR
        inputs[row, first + 1:first + 1 + second] = b.inputs[0]
        targets[row, first + 1:first + 1 + second] = b.targets[0]
    return inputs, targets


def train(mixer: str, steps: int = 800, seed: int = 0) -> SequenceModel:
    torch.manual_seed(seed)
    x, y = segmented(8000, seed)
    model = SequenceModel(mixer, d_model=64, n_layers=2, vocab_size=VOCAB + 1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(len(x), (64,), generator=g)
        loss = loss_fn(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test_x, test_y = segmented(256, seed=99)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    print("| model | test accuracy | layer | modulation (relative ESS drop after the delimiter) |")
    print("|---|---|---|---|")
    for ax, mixer, title in zip(axes, ("sa", "la"), ("softmax attention", "linear attention (elu+1)"),
                                strict=True):
        model = train(mixer)
        with torch.no_grad():
            acc = float(accuracy(model(test_x), test_y))
        result = ess_around_tokens(model, test_x[:64], SEPARATOR, window=12)
        for layer, curve in result.curves.items():
            label = f"{layer} (modulation {result.modulation[layer]:.2f})"
            ax.plot(result.offsets, curve, marker=".", label=label)
            print(f"| {mixer} | {acc:.3f} | {layer} | {result.modulation[layer]:.3f} |")
        ax.axvline(-0.5, color="k", ls=":", lw=0.8)
        ax.set(title=f"{title}, accuracy {acc:.2f}", xlabel="split offset from the delimiter")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("entropy-ESS (mean over heads and occurrences)")
    fig.tight_layout()
    fig.savefig("docs/figures/token_modulation.png", dpi=110)


if __name__ == "__main__":
    main()
