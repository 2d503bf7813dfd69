"""Cost of materializing a realization's ``T`` with a per-mode decay: the blocked build of
``ess_reg.operators.diagonal.materialize`` against the per-mode loop it replaced (kept here as the
reference), forward and backward, with a smooth decay and with resets in every block.

    python benchmarks/bench_materialize.py            # one thread, best of 3, ratios from one run
"""

from __future__ import annotations

import argparse
import time

import torch

from ess_reg.operators.diagonal import masked_decay, materialize

SHAPES = ((128, 64, 64), (32, 256, 16), (8, 512, 32))  # [M, L, N]


def per_mode_loop(c: torch.Tensor, b: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """The previous build: one element-wise pass over ``[M, L, L]`` per state mode."""
    length = c.shape[-2]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    cum = torch.cumsum(log_decay, dim=-2)
    out = torch.zeros(*c.shape[:-1], length, dtype=c.dtype)
    for n in range(c.shape[-1]):
        out = out + c[..., :, None, n] * b[..., None, :, n] * masked_decay(cum[..., n], causal)
    return out


def best_time(build, c, b, log_decay, rounds: int) -> float:
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        build(c, b, log_decay).sum().backward()
        best = min(best, time.perf_counter() - start)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), forward + backward, best of {args.rounds}")
    print("| M, L, N | decay | per-mode loop | blocked | ratio |")
    print("|---|---|---|---|---|")
    for m, length, n in SHAPES:
        generator = torch.Generator().manual_seed(0)
        for kind in ("smooth", "resets"):
            c = torch.randn(m, length, n, dtype=torch.float64, generator=generator).requires_grad_()
            b = torch.randn(m, length, n, dtype=torch.float64, generator=generator).requires_grad_()
            log_decay = -0.5 * torch.rand(m, length, n, dtype=torch.float64, generator=generator)
            if kind == "resets":  # 5% of the entries: every block of every channel holds one
                hit = torch.rand(m, length, n, generator=generator) < 0.05
                log_decay = torch.where(hit, torch.tensor(-1e3, dtype=torch.float64), log_decay)
            log_decay.requires_grad_()
            old = best_time(per_mode_loop, c, b, log_decay, args.rounds)
            new = best_time(materialize, c, b, log_decay, args.rounds)
            print(f"| {m}, {length}, {n} | {kind} | {old * 1e3:.0f} ms | {new * 1e3:.0f} ms | "
                  f"{old / new:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
