"""``diagnose``: flag saturated and collapsed layers from ESS / TSS."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ess_reg._table import format_table
from ess_reg.functional.summary import ess_summary
from ess_reg.operators import Operator

#: Default thresholds on utilization (ESS / TSS).
SATURATED_AT = 0.9
COLLAPSED_BELOW = 0.1


@dataclass(frozen=True)
class LayerDiagnosis:
    """One layer: ``status`` is ``"saturated"`` (utilization >= the saturation threshold: the layer
    needs more state), ``"collapsed"`` (below the collapse threshold: it uses little of the state it
    has) or ``"healthy"``; a layer without a finite state (``tss`` None: attention) at or above the
    saturation threshold is ``"full rank"`` (at its edge bound ``min(i, L - i)``, no state to grow)."""

    layer: str
    status: str
    utilization: float
    ess: float | None
    tss: float | None


@dataclass(frozen=True)
class Diagnosis:
    """Per-layer diagnoses with the thresholds used; ``str()`` gives a table."""

    layers: list[LayerDiagnosis]
    saturated_at: float
    collapsed_below: float

    def __getitem__(self, layer: str) -> LayerDiagnosis:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise KeyError(layer)

    @property
    def saturated(self) -> list[str]:
        return [d.layer for d in self.layers if d.status == "saturated"]

    @property
    def collapsed(self) -> list[str]:
        return [d.layer for d in self.layers if d.status == "collapsed"]

    def __str__(self) -> str:
        header = ("layer", "status", "utilization", "ESS", "TSS")
        rows = [(d.layer, d.status, f"{d.utilization:.3f}",
                 "-" if d.ess is None else f"{d.ess:.2f}", "-" if d.tss is None else f"{d.tss:g}")
                for d in self.layers]
        legend = (f"(saturated: utilization >= {self.saturated_at}; collapsed: < {self.collapsed_below}; "
                  "full rank: a layer without a finite state at its edge bound)")
        return format_table(header, rows) + "\n" + legend


def layer_status(utilization: float, saturated_at: float = SATURATED_AT,
                 collapsed_below: float = COLLAPSED_BELOW, *, finite_state: bool = True) -> str:
    """``"saturated"``, ``"collapsed"`` or ``"healthy"`` for one utilization (ESS / TSS);
    ``"full rank"`` instead of saturated for a layer without a finite state (``finite_state=False``)."""
    if utilization >= saturated_at:
        return "saturated" if finite_state else "full rank"
    return "collapsed" if utilization < collapsed_below else "healthy"


def diagnose(
    source: Mapping[str, Any] | Operator | torch.Tensor,
    *,
    saturated_at: float = SATURATED_AT,
    collapsed_below: float = COLLAPSED_BELOW,
    kind: str = "entropy",
    splits: Any = None,
) -> Diagnosis:
    """Classify every layer as saturated, collapsed or healthy from its utilization (ESS / TSS)
    (a layer without a finite state at its edge bound: "full rank").

    ``source`` is an ``ESSMetric.compute()`` result (keys ``"{layer}/utilization"``), a dict
    ``name -> operator`` (as from :func:`ess_reg.capture_operators`) or a single operator; for
    operators ESS is computed here with ``kind`` and ``splits``.
    """
    if not 0 <= collapsed_below < saturated_at <= 1:
        raise ValueError(
            f"need 0 <= collapsed_below < saturated_at <= 1, got {collapsed_below} and {saturated_at}"
        )
    entries = []
    for layer, (util, ess, tss) in _utilizations(source, kind, splits).items():
        status = layer_status(util, saturated_at, collapsed_below, finite_state=tss is not None)
        entries.append(LayerDiagnosis(layer, status, util, ess, tss))
    return Diagnosis(entries, saturated_at, collapsed_below)


def _utilizations(source, kind, splits) -> dict[str, tuple[float, float | None, float | None]]:
    if isinstance(source, Operator | torch.Tensor):
        source = {"operator": source}
    if not isinstance(source, Mapping) or not source:
        raise TypeError("diagnose needs an ESSMetric result, a dict of operators or an operator")
    if all(isinstance(v, Operator) or (isinstance(v, torch.Tensor) and v.dim() >= 3)
           for v in source.values()):
        out = {}
        for name, op in source.items():
            summary = ess_summary(op, kind, splits=splits)
            out[name] = (float(summary["utilization"]), float(summary["ess"]), summary["tss"])
        return out
    layers = [k[: -len("/utilization")] for k in source if k.endswith("/utilization")]
    if not layers:
        raise ValueError("diagnose: no '{layer}/utilization' keys in the metric result")
    return {
        layer: (float(source[f"{layer}/utilization"]),
                float(source[f"{layer}/ess"]) if f"{layer}/ess" in source else None,
                float(source[f"{layer}/tss"]) if f"{layer}/tss" in source else None)
        for layer in layers
    }
