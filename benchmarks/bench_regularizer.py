"""Cost of the ESS regularizer on the default MQAR model (GLA, d_model 64, 2 layers) at L = 256.

Prints, from one run: the training-step time with no regularizer, with the regularizer as a loss
term, and attached (gradient injected in the backward pass), 8 sampled splits, batch 32; and the
memory the forward (plus the penalty, in loss-term mode) keeps for the backward in each mode, counted
exactly through ``torch.autograd.graph.saved_tensors_hooks``.

    python benchmarks/bench_regularizer.py
"""

from __future__ import annotations

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


def _stepper(mode: str):
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

    step()  # warm-up
    return step


def step_times(modes: tuple[str, ...], rounds: int = 4, repeats: int = 4) -> dict[str, float]:
    """Seconds per step for each mode: modes interleaved round by round, the best round kept,
    so that drifts of a noisy machine hit every mode alike."""
    steppers = {mode: _stepper(mode) for mode in modes}
    best = {mode: float("inf") for mode in modes}
    for _ in range(rounds):
        for mode, step in steppers.items():
            start = time.perf_counter()
            for _ in range(repeats):
                step()
            best[mode] = min(best[mode], (time.perf_counter() - start) / repeats)
    return best


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
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; GLA d_model 64, 2 layers, "
          f"L={LENGTH}, batch {BATCH}, 8 sampled splits")
    times = step_times(("none", "loss", "attach"))
    for mode, seconds in times.items():
        print(f"step time {mode:6s} {seconds * 1e3:7.1f} ms   ratio {seconds / times['none']:.2f}x")
    for mode in ("none", "loss", "attach"):
        print(f"forward: graph saved for backward {saved_for_backward(mode):7.1f} MiB   ({mode})")


if __name__ == "__main__":
    main()
