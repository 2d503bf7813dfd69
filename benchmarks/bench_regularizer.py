"""Cost of the ESS regularizer per training step, on the cases of benchmarks/regularizer_cases.py.

Prints, from one run per case: the step time with no regularizer, with the regularizer as a loss
term, and attached (gradient injected in the backward pass), all with ``ESSRegularizer`` defaults
(8 random splits, ``max_operators="auto"``), their ratios, the penalty's own time (its forward and
backward into the captured operators, the model excluded: what it adds to a fused GPU step), the
same with every operator (``max_operators=None``), and the memory the forward (plus the penalty,
in loss-term mode) keeps for the backward, counted exactly through
``torch.autograd.graph.saved_tensors_hooks``.

    python benchmarks/bench_regularizer.py                 # gla, attention, gla_wide, mamba
    python benchmarks/bench_regularizer.py --cases gla --threads 1
    python benchmarks/bench_regularizer.py --cases gla --operators 8,16,32,64,128   # cost per operator

``--operators`` prints the penalty's own time at each ``max_operators`` count instead: the part
that stays as the count falls is the penalty's fixed cost per layer (its many small operations).
``--peak-memory`` prints, per case and mode, how much one training step raises the process's peak
resident memory (each in a fresh subprocess, measured from just before the first step, so the
optimizer's state counts alike in every mode).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regularizer_cases import CASES, Case, build, penalty_time, step_times, stepper

from ess_reg import ESSRegularizer


def saved_for_backward(case: Case, mode: str) -> float:
    """MiB of distinct tensor storage the autograd graph holds after the forward (and the penalty,
    in loss-term mode): exactly what the forward keeps alive for the backward."""
    reg = None if mode == "none" else ESSRegularizer(case.model)
    if mode == "attach":
        reg.attach()
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = case.loss(case.model, case.inputs)
            if mode == "loss":
                loss = loss + reg()
    finally:
        if reg is not None:
            reg.remove()
    return sum(storages.values()) / 2**20


def measure(name: str, rounds: int, penalty_only: bool = False) -> list[str]:
    """The report lines of one case (``penalty_only``: the penalty's own time alone)."""
    device = torch.device("cpu")
    case = build(name, device)
    lines = [f"## {name}: {case.description}"]
    if penalty_only:
        auto = penalty_time(case, rounds=rounds)
        every = penalty_time(case, rounds=rounds, max_operators=None)
        return [*lines, f"penalty alone: {auto * 1e3:.1f} ms (max_operators='auto'), {every * 1e3:.1f} ms "
                        f"(every operator), {every / auto:.1f}x"]
    steppers = {mode: stepper(build(name, device), mode) for mode in ("none", "loss", "attach")}
    times = step_times(steppers, device, rounds=rounds, repeats=1)
    for mode, seconds in times.items():
        lines.append(f"step time {mode:6s} {seconds * 1e3:9.1f} ms   ratio {seconds / times['none']:.2f}x")
    auto = penalty_time(build(name, device), rounds=rounds)
    every = penalty_time(build(name, device), rounds=rounds, max_operators=None)
    lines.append(f"penalty alone: {auto * 1e3:.1f} ms (max_operators='auto'), {every * 1e3:.1f} ms (every "
                 f"operator), {every / auto:.1f}x")
    for mode in ("none", "loss", "attach"):
        saved = saved_for_backward(build(name, device), mode)
        lines.append(f"forward: graph saved for backward {saved:8.1f} MiB   ({mode})")
    return lines


def operator_scaling(name: str, counts: list[int], rounds: int) -> list[str]:
    """The penalty's own time at each ``max_operators`` count (interleaved, best round kept)."""
    case = build(name, torch.device("cpu"))
    best = {count: float("inf") for count in counts}
    for _ in range(rounds):
        for count in counts:
            best[count] = min(best[count], penalty_time(case, rounds=1, max_operators=count))
    lines = [f"## {name}: {case.description}", "| operators a layer | penalty alone | per operator |",
             "|---|---|---|"]
    lines += [f"| {count} | {best[count] * 1e3:.1f} ms | {best[count] / count * 1e3:.2f} ms |"
              for count in counts]
    if len(counts) > 1:
        low, high = min(counts), max(counts)
        slope = (best[high] - best[low]) / (high - low)
        fixed = best[low] - slope * low
        lines.append(f"fit: {fixed * 1e3:.1f} ms fixed + {slope * 1e3:.3f} ms per operator a layer "
                     "(all layers together)")
    return lines


def step_peak_mib(name: str, mode: str) -> float:
    """MiB by which one training step of ``mode`` raises this process's peak resident memory."""
    step = stepper(build(name, torch.device("cpu")), mode)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024


def peak_memory(name: str) -> list[str]:
    """The peak-memory lines of one case, each mode in a fresh subprocess."""
    lines = [f"## {name}: peak resident memory of one step (growth from just before it)"]
    peaks = {}
    for mode in ("none", "loss", "attach"):
        here = str(Path(__file__).resolve().parent)
        code = (f"import sys; sys.path.insert(0, {here!r}); import json, bench_regularizer as b; "
                f"print(json.dumps(b.step_peak_mib({name!r}, {mode!r})))")
        out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
        peaks[mode] = json.loads(out.strip().splitlines()[-1])
        extra = peaks[mode] - peaks["none"]
        lines.append(f"peak {mode:6s} +{peaks[mode]:8.1f} MiB   (+{extra:.1f} over none)")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (best kept)")
    parser.add_argument("--penalty-only", action="store_true", help="only the penalty's own time")
    parser.add_argument("--operators", default=None,
                        help="comma-separated max_operators counts: the penalty's time at each")
    parser.add_argument("--peak-memory", action="store_true",
                        help="only each mode's peak memory growth over one step (fresh subprocesses)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.cases.split(","):
        if args.peak_memory:
            print("\n".join(peak_memory(name)), flush=True)
        elif args.operators:
            counts = [int(c) for c in args.operators.split(",")]
            print("\n".join(operator_scaling(name, counts, args.rounds)), flush=True)
        else:
            print("\n".join(measure(name, args.rounds, args.penalty_only)), flush=True)


if __name__ == "__main__":
    main()
