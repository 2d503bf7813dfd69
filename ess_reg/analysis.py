"""Per-layer ESS reports of whole models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ess_reg.capture import capture_operators
from ess_reg.functional import (
    entropy_ess,
    resolve_splits,
    split_singular_values,
    tolerance_ess,
    utilization_from_curve,
)


@dataclass
class LayerReport:
    """ESS of one layer on a batch of inputs.

    ``entropy_ess`` / ``tolerance_ess``: average ESS per channel (mean over splits, channels and
    examples). ``total_ess``: summed over channels (mean over examples). ``utilization``: ESS / TSS
    (or ESS / ``min(i, L - i)`` without a finite state). ``ess_per_kv``: ``total_ess / kv_pairs``
    for MQAR. ``splits`` and ``curve``: the mean entropy-ESS at each split, for plots.
    """

    name: str
    mixer: str
    tss: int | None
    channels: int
    entropy_ess: float
    tolerance_ess: float
    total_ess: float
    utilization: float
    ess_per_kv: float | None
    splits: np.ndarray
    curve: np.ndarray

    @property
    def label(self) -> str:
        return f"{self.name} ({self.mixer})"


def layer_report(
    model: nn.Module, inputs: Any, config: Any = None, *, splits: int | None = None
) -> list[LayerReport]:
    """Capture every recognised mixer of ``model`` on ``inputs`` and summarise its ESS.

    ``config`` (optional) supplies ``task`` and ``kv_pairs`` for ESS/kv.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            operators = capture_operators(model, inputs)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    kv = getattr(config, "kv_pairs", None) if getattr(config, "task", None) == "mqar" else None
    reports = []
    for name, op in operators.items():
        index = resolve_splits(splits, op.seq_len)
        sigma = split_singular_values(op, splits=index).double()
        curve = entropy_ess(sigma)  # [B, C, S]
        total = float(curve.mean(-1).sum(-1).mean())
        reports.append(LayerReport(
            name=name,
            mixer=getattr(modules[name], "name", "") or type(modules[name]).__name__,
            tss=op.state_size,
            channels=op.num_channels,
            entropy_ess=float(curve.mean()),
            tolerance_ess=float(tolerance_ess(sigma).mean()),
            total_ess=total,
            utilization=float(utilization_from_curve(curve, op, splits=index).mean()),
            ess_per_kv=None if not kv else total / kv,
            splits=index.numpy(),
            curve=curve.mean(dim=tuple(range(curve.dim() - 1))).numpy(),
        ))
    return reports


def format_reports(reports: list[LayerReport]) -> str:
    """Plain-text table of layer reports."""
    header = ("layer", "mixer", "TSS/ch", "channels", "ESS ent", "ESS tol", "total ESS",
              "utilization", "ESS/kv")
    rows = [
        (r.name, r.mixer, "-" if r.tss is None else str(r.tss), str(r.channels),
         f"{r.entropy_ess:.2f}", f"{r.tolerance_ess:.2f}", f"{r.total_ess:.1f}",
         f"{r.utilization:.3f}", "-" if r.ess_per_kv is None else f"{r.ess_per_kv:.2f}")
        for r in reports
    ]
    widths = [max(len(x) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), "  ".join("-" * w for w in widths),
                      *(fmt.format(*row) for row in rows)])
