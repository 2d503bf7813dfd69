"""The noise ``max_operators="auto"`` adds to the penalty, against the noise of the random splits.

    python benchmarks/sampling_noise.py

For a 2-layer softmax-attention MQAR model (``L = 256``, batch 32: ``auto`` keeps 8 of 128
operators a layer) and a GLA-S6 model (``L = 64``, batch 64: 610 of 8192), at initialization, on one
batch: each layer's utilization with every operator, and the mean and sd over 40 steps of the
sampled value, first with the splits fixed (only the operator sample varies), then with the default
8 random splits drawn afresh each step (both vary), against the full value at the first step's splits.
"""

from __future__ import annotations

import statistics

import torch

from ess_reg import ESSRegularizer
from ess_reg.models import SequenceModel
from ess_reg.tasks import MQAR


def study(mixer: str, d_model: int, batch: int, length: int, kv: int, vocab: int, draws: int = 40,
          **kwargs) -> list[str]:
    torch.manual_seed(0)
    model = SequenceModel(mixer, d_model, 2, vocab, **kwargs)
    reg = ESSRegularizer(model, splits=8)
    model(MQAR(batch, length, kv, vocab, seed=0).inputs)
    operators = {name: entries[0][0] for name, entries in reg._pending.items()}
    first = reg._splits_for(length)
    lines = []
    with torch.no_grad():
        for name, op in operators.items():
            reg.splits, reg.step_count = first, 0
            full = float(reg._utilization(op, None, None))
            for label, splits in (("fixed splits", first), ("random splits", 8)):
                reg.splits = splits
                values, kept = [], None
                for step in range(draws):
                    reg.step_count = step
                    sample = reg._sample(name, op, None)
                    kept = sample[0].shape[0]
                    values.append(float(reg._utilization(*sample, None)))
                sd = statistics.stdev(values)
                lines.append(f"{mixer} {name}, {label}: {kept} of {op.shape[0] * op.shape[1]} operators; "
                             f"full {full:.4f}, sampled mean {statistics.fmean(values):.4f}, "
                             f"sd {sd:.4f} ({sd / full:.1%} of full)")
    return lines


def main() -> None:
    torch.set_num_threads(1)
    for line in [*study("sa", 64, 32, 256, 16, 512), *study("gla_s6", 64, 64, 64, 4, 256, d_state=16)]:
        print(line, flush=True)


if __name__ == "__main__":
    main()
