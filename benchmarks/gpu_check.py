"""The first thing to run on a CUDA machine (``make gpu-check``; a few minutes).

    python benchmarks/gpu_check.py            # on the first CUDA device; one line and exit 0 without
    python benchmarks/gpu_check.py --quick    # small sizes (what `make test` runs on the CPU)

Checks, then measures, and prints one markdown table (paste it into docs/performance.md):

1. **Agreement**: both routes' singular values and the entropy-ESS on the device equal the CPU
   float64 results (relative 1e-10 in float64; 1e-4 of each block's largest value in float32), and
   ``ESSRegularizer``'s penalty and gradients on the device equal the CPU's (1e-10 in float64).
2. **No host synchronisation**: one attached-mode regularized training step runs under
   ``torch.cuda.set_sync_debug_mode("warn")``; every synchronising call is listed by source line.
   Those on a line that calls ``torch.linalg`` are PyTorch's own (its SVD and eigh read LAPACK's
   status on the host, and PyTorch has no ``_ex`` variant of them); any other is a FAIL.
3. **Cost**: route timings (Gramian route vs the per-split SVD loop at ``L = 1024``, ``N = 16``, one
   channel, all splits); per case of benchmarks/regularizer_cases.py the plain, loss-term and
   attached step times, their ratios, the penalty's own time and the peak device memory.

Exit code 1 when a check fails, 0 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from regularizer_cases import CASES, build, penalty_time, step_times, stepper

from ess_reg import DenseOperator, DiagonalRealization, ESSRegularizer, ess_curve, split_singular_values

Row = dict[str, Any]


def _realization(channels: int, length: int, state: int, dtype: torch.dtype) -> DiagonalRealization:
    """A GLA-like realization with reset-like gates and channels of very different scales."""
    g = torch.Generator().manual_seed(0)
    c = torch.randn(channels, length, state, generator=g, dtype=torch.float64)
    b = torch.randn(channels, length, state, generator=g, dtype=torch.float64)
    log_decay = -torch.rand(channels, length, state, generator=g, dtype=torch.float64) * 0.3
    log_decay[:, length // 3] = -1e3  # a reset
    scale = torch.logspace(-20, 20, channels, dtype=torch.float64)[:, None, None]
    return DiagonalRealization((c * scale).to(dtype), b.to(dtype), log_decay.to(dtype))


def _relative(device_values: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest error relative to each block's largest reference value."""
    peak = reference.abs().amax(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return float(((device_values.double().cpu() - reference) / peak).abs().max())


def agreement(device: torch.device, quick: bool) -> list[Row]:
    """Routes and the regularizer on ``device`` against the CPU in float64."""
    rows = []
    length, state = (24, 4) if quick else (128, 16)
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-4)):
        op = _realization(6, length, state, dtype)
        for method in ("gramian", "dense"):
            reference = split_singular_values(_realization(6, length, state, torch.float64), method=method)
            values = split_singular_values(op.to(device), method=method, dtype=dtype)
            error = _relative(values, reference)
            rows.append({"check": f"{method} route, {str(dtype)[6:]}", "result": f"{error:.1e}",
                         "pass": error <= tol, "target": f"<= {tol:g}"})
    g = torch.Generator().manual_seed(1)
    matrix = torch.randn(3, length, length, generator=g, dtype=torch.float64).tril()
    reference = ess_curve(DenseOperator(matrix))
    error = float((ess_curve(DenseOperator(matrix.to(device))).cpu() - reference).abs().max())
    rows.append({"check": "entropy-ESS, dense, float64", "result": f"{error:.1e}", "pass": error <= 1e-10,
                 "target": "<= 1e-10"})
    rows.append(_regularizer_agreement(device, quick))
    return rows


def _regularizer_agreement(device: torch.device, quick: bool) -> Row:
    results = []
    for where in ("cpu", device):
        case = build("gla", where, small=True, dtype=torch.float64)
        reg = ESSRegularizer(case.model, splits=[3, 9, 17, 25], weight=0.5)
        loss = case.loss(case.model, case.inputs) * 0 + reg()
        loss.backward()
        results.append((reg.last_penalty.cpu(), [p.grad.cpu() for p in case.model.parameters()]))
        reg.remove()
    (p_cpu, g_cpu), (p_dev, g_dev) = results
    error = max([float((p_dev - p_cpu).abs() / p_cpu.abs().clamp_min(1e-300))]
                + [float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) for a, b in zip(g_dev, g_cpu,
                                                                                                 strict=True)])
    return {"check": "ESSRegularizer penalty and gradients, float64", "result": f"{error:.1e}",
            "pass": error <= 1e-10, "target": "<= 1e-10"}


def no_host_sync(device: torch.device, quick: bool) -> Row:
    """An attached-mode step under the CUDA sync debugger: the warnings it raises, if any."""
    if device.type != "cuda":
        return {"check": "no host sync in an attached step", "result": "n/a (needs CUDA)", "pass": True,
                "target": "0 warnings"}
    case = build("gla", device, small=quick)
    step = stepper(case, "attach", splits=8)
    step()  # warm-up: first-call allocations and lazy initialisation are not the steady state
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    ours, linalg = sync_sources(caught)
    detail = "; ".join(f"{where} x{count}" for where, count in sorted(ours.items()))
    return {"check": "no host sync in an attached step (outside torch.linalg)",
            "result": f"{sum(ours.values())} ({sum(linalg.values())} inside torch.linalg)"
                      + (f": {detail}"[:400] if ours else ""),
            "pass": not ours, "target": "0"}


def sync_sources(caught: list[warnings.WarningMessage]) -> tuple[dict[str, int], dict[str, int]]:
    """Count the synchronisation warnings by ``file:line``: those whose line calls ``torch.linalg``
    (PyTorch's own status checks) apart from the others."""
    import linecache

    ours: dict[str, int] = {}
    linalg: dict[str, int] = {}
    for w in caught:
        if "synchroniz" not in str(w.message).lower():
            continue
        where = f"{Path(w.filename).name}:{w.lineno}"
        bucket = linalg if "torch.linalg." in linecache.getline(w.filename, w.lineno) else ours
        bucket[where] = bucket.get(where, 0) + 1
    return ours, linalg


def route_timing(device: torch.device, quick: bool) -> Row:
    """Gramian route vs the per-split SVD loop, one channel, every split."""
    length, state = (64, 4) if quick else (1024, 16)
    op = _realization(1, length, state, torch.float64).to(device)
    times = {}
    for method in ("gramian", "dense"):
        times[method] = _best(lambda m=method: split_singular_values(op, method=m), device)
    return {"check": f"Gramian vs dense route, L={length}, N={state}, all splits",
            "result": f"{times['gramian']:.3f} s vs {times['dense']:.3f} s "
                      f"({times['dense'] / times['gramian']:.0f}x)", "pass": True, "target": "report"}


def _best(fn: Callable[[], Any], device: torch.device, rounds: int = 2) -> float:
    fn()
    best = float("inf")
    for _ in range(rounds):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return best


def step_costs(device: torch.device, quick: bool, cases: tuple[str, ...] = CASES) -> list[Row]:
    """Plain, loss-term and attached step times, ratios, the penalty's own time, peak memory."""
    rows = []
    for name in cases:
        times, peaks = {}, {}
        for mode in ("none", "loss", "attach"):
            case = build(name, device, small=quick)
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            times[mode] = step_times({mode: stepper(case, mode)}, device, rounds=2, repeats=1)[mode]
            peaks[mode] = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
        own = penalty_time(build(name, device, small=quick), rounds=2)
        memory = ("" if peaks["none"] is None else
                  f"; peak {peaks['none']:.0f} / {peaks['loss']:.0f} / {peaks['attach']:.0f} MiB")
        plain = times["none"]
        ratios = f"loss term {times['loss'] / plain:.2f}x, attached {times['attach'] / plain:.2f}x"
        rows.append({"check": f"step cost: {name}{' (small)' if quick else ''}",
                     "result": f"{plain * 1e3:.1f} ms plain, {ratios}, penalty alone {own * 1e3:.1f} ms"
                               + memory,
                     "pass": True, "target": "report"})
    return rows


def run(device: torch.device, quick: bool = False, cases: tuple[str, ...] = CASES) -> list[Row]:
    """Every check and measurement on ``device``, as table rows."""
    return [*agreement(device, quick), no_host_sync(device, quick), route_timing(device, quick),
            *step_costs(device, quick, cases)]


def table(rows: list[Row], device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"Device: {name}; torch {torch.__version__}", "", "| check | result | target | status |",
             "|---|---|---|---|"]
    for row in rows:
        status = "ok" if row["target"] == "report" else ("PASS" if row["pass"] else "FAIL")
        lines.append(f"| {row['check']} | {row['result']} | {row['target']} | {status} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--device", default=None, help="default: cuda, if there is one")
    parser.add_argument("--cases", default=",".join(CASES), help=f"step-cost cases ({', '.join(CASES)})")
    args = parser.parse_args(argv)
    if args.device is None and not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); nothing to check")
        return 0
    device = torch.device(args.device or "cuda")
    cases = tuple(c for c in args.cases.split(",") if c)
    rows = run(device, quick=args.quick, cases=cases)
    print(table(rows, device))
    return 0 if all(row["pass"] for row in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
