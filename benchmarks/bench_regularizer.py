"""Cost of the ESS regularizer on the default MQAR model (GLA, d_model 64, 2 layers) at L = 256.

Prints, from one run: the training-step time with no regularizer, with the regularizer as a loss
term, and attached (gradient injected in the backward pass), 8 sampled splits, batch 32; and the
peak memory of the forward (plus the penalty, in loss-term mode) in each mode, each measured in its
own subprocess.

    python benchmarks/bench_regularizer.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

import torch

from ess_reg import ESSRegularizer
from ess_reg.models import SequenceModel
from ess_reg.tasks import MQAR, loss_fn

BATCH, LENGTH, KV, VOCAB = 32, 256, 16, 512


def _setup(mode: str):
    torch.manual_seed(0)
    task = MQAR(BATCH, LENGTH, KV, VOCAB, seed=0)
    model = SequenceModel("gla", 64, 2, VOCAB)
    reg = None if mode == "none" else ESSRegularizer(model, splits=8)
    if mode == "attach":
        reg.attach()
    return model, reg, task.inputs, task.targets


def step_time(mode: str, repeats: int = 10) -> float:
    model, reg, x, y = _setup(mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():
        loss = loss_fn(model(x), y)
        if mode == "loss":
            loss = loss + reg()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if mode == "attach":
            reg.advance()

    step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def forward_peak(mode: str) -> float:
    """Peak RSS growth (MiB) of one forward (and, in loss-term mode, the penalty's graph), in a
    fresh process."""
    model, reg, x, y = _setup(mode)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = loss_fn(model(x), y)
    if mode == "loss":
        loss = loss + reg()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - base) / 1024


def saved_for_backward(mode: str) -> float:
    """MiB of distinct tensor storage the autograd graph holds after the forward (and the penalty,
    in loss-term mode): exactly what the forward keeps alive for the backward."""
    model, reg, x, y = _setup(mode)
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(model(x), y)
        if mode == "loss":
            loss = loss + reg()
    return sum(storages.values()) / 2**20


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        print(json.dumps(forward_peak(sys.argv[2])))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GLA d_model 64, 2 layers, "
          f"L={LENGTH}, batch {BATCH}, 8 sampled splits")
    times = {mode: step_time(mode) for mode in ("none", "loss", "attach")}
    for mode, seconds in times.items():
        print(f"step time {mode:6s} {seconds * 1e3:7.1f} ms   ratio {seconds / times['none']:.2f}x")
    for mode in ("none", "loss", "attach"):
        out = subprocess.run([sys.executable, __file__, "--peak", mode], check=True,
                             capture_output=True, text=True).stdout
        peak = json.loads(out.strip().splitlines()[-1])
        print(f"forward: graph saved for backward {saved_for_backward(mode):7.1f} MiB, "
              f"peak RSS growth +{peak:7.1f} MiB   ({mode})")


if __name__ == "__main__":
    main()
