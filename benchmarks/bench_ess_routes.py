"""Benchmark the two exact ESS routes; prints times, ratios and peak memory from one run.

Each case runs in its own subprocess so its peak resident memory is its own. Ratios compare
cases measured back to back in this run (machines are noisy; compare ratios, not seconds).

    python benchmarks/bench_ess_routes.py            # all cases
    python benchmarks/bench_ess_routes.py --quick    # smaller sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def _realization(channels: int, length: int, n: int, seed: int = 0):
    from ess_reg import DiagonalRealization

    g = torch.Generator().manual_seed(seed)
    c = torch.randn(channels, length, n, generator=g)
    b = torch.randn(channels, length, n, generator=g)
    log_decay = torch.nn.functional.logsigmoid(torch.randn(channels, length, n, generator=g) + 3)
    return DiagonalRealization(c, b, log_decay / 4)


def _causal(channels: int, length: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, length, length, generator=g, dtype=torch.float64).tril()


def _time(fn, repeats: int = 3, budget: float = 1.0, most: int = 20) -> float:
    """Best of at least ``repeats`` calls after one warm-up call (LAPACK workspaces, thread pool);
    short cases repeat until ``budget`` seconds are spent (at most ``most`` calls), so their best
    time is as steady as the long cases'."""
    fn()
    best, spent, calls = float("inf"), 0.0, 0
    while calls < repeats or (spent < budget and calls < most):
        start = time.perf_counter()
        fn()
        took = time.perf_counter() - start
        best, spent, calls = min(best, took), spent + took, calls + 1
    return best


def _split_loop(matrix: torch.Tensor):
    """The baseline: one ``svdvals`` call per split (batched over channels), then entropy-ESS."""
    from ess_reg.functional import entropy_ess

    length = matrix.shape[-1]
    return lambda: torch.stack(
        [entropy_ess(torch.linalg.svdvals(matrix[:, i:, :i])[:, :min(i, length - i)].nan_to_num())
         for i in range(1, length)], dim=-1)


def case(name: str, quick: bool) -> dict:
    """Run one case in this process; returns seconds and the peak RSS growth in MiB."""
    from ess_reg import average_ess, ess_curve

    scale = 4 if quick else 1
    if name == "gramian_L1024":
        op = _realization(1, 1024 // scale, 16)
        fn = lambda: ess_curve(op, method="gramian")
    elif name == "dense_L1024":
        op = _realization(1, 1024 // scale, 16)
        fn = lambda: ess_curve(op, method="dense")
    elif name == "dense_batched_L256":
        matrix = _causal(8, 256 // scale)
        fn = lambda: ess_curve(matrix, method="dense")
    elif name in ("dense_loop_L256", "dense_loop_one_thread_L256"):
        if name == "dense_loop_one_thread_L256":
            torch.set_num_threads(1)  # the loop's best setting here: LAPACK threads slow small SVDs
        fn = _split_loop(_causal(8, 256 // scale))
    elif name == "dense_channel_loop_L256":
        from ess_reg.functional import entropy_ess

        matrix = _causal(8, 256 // scale)
        length = matrix.shape[-1]
        fn = lambda: [[entropy_ess(torch.linalg.svdvals(matrix[ch, i:, :i]))
                       for i in range(1, length)] for ch in range(matrix.shape[0])]
    elif name in ("dense_batched_low_rank_L256", "dense_loop_low_rank_L256"):
        # a materialized N = 16 realization: rank-deficient blocks, so no Gram eigenvalues
        matrix = _realization(8, 256 // scale, 16).dense(torch.float64)
        if name.startswith("dense_batched"):
            fn = lambda: ess_curve(matrix, method="dense")
        else:
            torch.set_num_threads(1)  # the loop's steadier setting (see the one-thread case)
            fn = _split_loop(matrix)
    elif name == "gramian_all_splits_L4096_C64":
        op = _realization(64, 4096 // scale, 16)
        fn = lambda: ess_curve(op)
    elif name == "gramian_grad_8_splits_L4096_C64":
        op = _realization(64, 4096 // scale, 16)
        leaves = [t.requires_grad_() for t in op.tensors()]

        def fn():
            average_ess(op, splits=8).sum().backward()
            for t in leaves:
                t.grad = None
    else:
        raise ValueError(f"unknown case {name}")
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds = _time(fn)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"name": name, "seconds": seconds, "peak_mib": (peak - base) / 1024}


def run_in_subprocess(name: str, quick: bool) -> dict:
    cmd = [sys.executable, __file__, "--case", name] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


CASES = [
    "gramian_L1024", "dense_L1024", "dense_batched_L256", "dense_loop_L256",
    "dense_loop_one_thread_L256", "dense_channel_loop_L256", "dense_batched_low_rank_L256",
    "dense_loop_low_rank_L256", "gramian_all_splits_L4096_C64",
    "gramian_grad_8_splits_L4096_C64",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", help="run one case in this process and print JSON")
    parser.add_argument("--quick", action="store_true", help="4x shorter sequences")
    args = parser.parse_args()
    if args.case:
        print(json.dumps(case(args.case, args.quick)))
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, quick={args.quick}")
    results = {}
    for name in CASES:
        results[name] = run_in_subprocess(name, args.quick)
        r = results[name]
        print(f"{name:34s} {r['seconds']:9.3f} s   peak +{r['peak_mib']:8.1f} MiB", flush=True)
    s = {k: v["seconds"] for k, v in results.items()}
    print()
    print(f"gramian vs dense route, L=1024 N=16 (target >= 100x): "
          f"{s['dense_L1024'] / s['gramian_L1024']:.0f}x")
    print(f"dense batched vs per-split loop, L=256 (target >= 3x): "
          f"{s['dense_loop_L256'] / s['dense_batched_L256']:.2f}x")
    print(f"dense batched vs per-split loop on one LAPACK thread, L=256: "
          f"{s['dense_loop_one_thread_L256'] / s['dense_batched_L256']:.2f}x")
    print(f"dense batched vs per-channel per-split loop, L=256: "
          f"{s['dense_channel_loop_L256'] / s['dense_batched_L256']:.2f}x")
    print(f"dense batched vs per-split loop on one LAPACK thread, rank-16 blocks, L=256: "
          f"{s['dense_loop_low_rank_L256'] / s['dense_batched_low_rank_L256']:.2f}x")
    print(f"all splits, 64 channels, N=16, L=4096 (target < 5 s): "
          f"{s['gramian_all_splits_L4096_C64']:.2f} s")


if __name__ == "__main__":
    main()
