"""A small ESS analysis of typical operator families (the default ``ess-reg showcase`` job)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from ess_reg._table import format_table as _format_table
from ess_reg.functional import (
    entropy_ess,
    resolve_method,
    resolve_splits,
    split_spectrum,
    tolerance_ess,
    utilization_from_curve,
)
from ess_reg.operators import DenseOperator, DiagonalRealization, Operator


@dataclass(frozen=True)
class ShowcaseRow:
    """One line of the showcase table."""

    name: str
    route: str
    tss: int | None
    entropy_ess: float
    tolerance_ess: float
    utilization: float
    seconds: float


def example_operators(
    seq_len: int = 256, state: int = 16, channels: int = 8, seed: int = 0
) -> dict[str, Operator]:
    """Random operators of common mixer families, ``channels`` each, ``[C, L, ...]``."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g)

    shape = (channels, seq_len, state)
    q, k = randn(*shape), randn(*shape)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    normalizer = (phi_q * phi_k.cumsum(1)).sum(-1, keepdim=True)
    gate = torch.nn.functional.logsigmoid(randn(*shape) + 3.0) / 16
    dt = torch.exp(randn(channels, seq_len, 1) * 0.5 - 3.0)
    n = state // 2
    s4d_a = torch.complex(torch.full((n,), -0.5), math.pi * torch.arange(n, dtype=torch.float32))
    s4d_dt = torch.exp(torch.linspace(math.log(1e-3), math.log(1e-1), channels))[:, None]
    ones = torch.ones(channels, seq_len, n)
    decay = (s4d_dt * s4d_a)[:, None, :] * ones
    s4d_b = (torch.exp(decay) - 1) / s4d_a  # ZOH with B = 1
    s4d_c = 2 * torch.complex(randn(channels, 1, n), randn(channels, 1, n)) * ones
    scores = q @ k.mT / math.sqrt(state)
    causal = torch.ones(seq_len, seq_len, dtype=torch.bool).tril()
    attention = torch.softmax(scores.masked_fill(~causal, -torch.inf), dim=-1)
    return {
        "linear attention (elu+1)": DiagonalRealization(phi_q / normalizer, phi_k),
        "gated linear attention": DiagonalRealization(q / math.sqrt(state), k, gate),
        "Mamba-2 scalar decay": DiagonalRealization(q, k * dt, -dt * torch.exp(randn(channels, 1, 1))),
        "S4D-Lin (complex, LTI)": DiagonalRealization(s4d_c, s4d_b * ones, decay),
        "softmax attention": DenseOperator(attention),
    }


def run_showcase(
    seq_len: int = 256, state: int = 16, channels: int = 8, seed: int = 0, splits: int | None = None
) -> list[ShowcaseRow]:
    """Average entropy- and tolerance-ESS of each example operator (one SVD pass per operator)."""
    rows = []
    for name, op in example_operators(seq_len, state, channels, seed).items():
        start = time.perf_counter()
        index = resolve_splits(splits, seq_len)
        sigma = split_spectrum(op, splits=index).values
        entropy, tolerance = entropy_ess(sigma), tolerance_ess(sigma)
        util = utilization_from_curve(entropy, op, splits=index)
        rows.append(ShowcaseRow(
            name, resolve_method(op, splits=index), op.state_size, float(entropy.mean()),
            float(tolerance.mean()), float(util.mean()), time.perf_counter() - start,
        ))
    return rows


def format_table(rows: list[ShowcaseRow]) -> str:
    """Plain-text table of showcase rows."""
    header = ("operator", "route", "TSS/ch", "ESS entropy", "ESS tol", "utilization", "time")
    lines = [
        (r.name, r.route, "-" if r.tss is None else str(r.tss), f"{r.entropy_ess:.2f}",
         f"{r.tolerance_ess:.2f}", f"{r.utilization:.3f}", f"{r.seconds * 1e3:.0f} ms")
        for r in rows
    ]
    return _format_table(header, lines)
