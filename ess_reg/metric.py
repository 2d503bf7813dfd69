"""``ESSMetric``: effective state-size as a torchmetrics ``Metric``."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

import torch
from torchmetrics import Metric

from ess_reg._warnings import warn_user
from ess_reg.functional.ess import DEFAULT_TOL, SAMPLED_DENSE_SPLITS, _is_long_dense
from ess_reg.functional.splits import Splits, resolve_splits
from ess_reg.functional.summary import _ess_compute, _ess_update
from ess_reg.operators import Operator, as_operator

_STAT_NAMES = ("sum", "util_sum", "total_sum")


class ESSMetric(Metric):
    r"""Average effective state-size per layer, accumulated over batches (and synced across ranks).

    ``update(operators)`` takes one operator (logged as layer ``"operator"``) or a dict
    ``name -> operator``, as returned by :func:`ess_reg.capture_operators` or
    ``ESSRegularizer.operators``. ``compute()`` returns a flat dict of scalar tensors:

    - ``"{layer}/ess"``: average ESS per channel (mean over splits, channels and every sample seen),
      equal to ``average_ess(op).mean()`` over the same data;
    - ``"{layer}/total_ess"``: summed over channels (mean over samples);
    - ``"{layer}/utilization"``: ESS / TSS (ESS_i / ``min(i, L - i)`` without a finite state);
    - ``"{layer}/tss"``: TSS per channel (only for layers with a finite state);
    - ``"ess/total"`` (sum of the layers' total ESS) and ``"ess/mean_utilization"``;
    - with ``kind="both"``, the tolerance values again under ``"{layer}/ess_tolerance"``, ... ;
    - with ``curve=True``, ``"{layer}/curve"``: mean ESS at each split (a 1-D tensor).

    States are sums with ``dist_reduce_fx="sum"``, so the DDP result equals the single-process one.
    ESS is a diagnostic: ``higher_is_better`` is None, and values are detached (use the functional
    API or :class:`ess_reg.ESSRegularizer` for gradients).

    Args:
        kind: ``"entropy"`` (default), ``"tolerance"`` or ``"both"``.
        splits: as in :func:`ess_reg.ess_curve` (default: all splits; for a layer on the dense
            route longer than 257 a warning suggests ``splits=64``).
        tol: the tolerance of tolerance-ESS.
        relative: whether ``tol`` is relative to each block's largest singular value.
        curve: also keep the mean ESS per split index (needs the same splits on every update).
        kwargs: Additional keyword arguments of ``torchmetrics.Metric``.
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False
    plot_lower_bound = 0.0

    def __init__(
        self,
        kind: str = "entropy",
        *,
        splits: Splits = None,
        tol: float = DEFAULT_TOL,
        relative: bool = True,
        curve: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if kind not in ("entropy", "tolerance", "both"):
            raise ValueError(f"kind must be 'entropy', 'tolerance' or 'both', got {kind!r}")
        if not (isinstance(tol, int | float) and tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {tol!r}")
        self.kind, self.splits, self.tol, self.relative, self.curve = kind, splits, tol, relative, curve
        self.kinds = ("entropy", "tolerance") if kind == "both" else (kind,)
        self.layers: dict[str, str] = {}  # layer name -> state prefix
        self.tss: dict[str, int | None] = {}
        self.curve_splits: dict[str, torch.Tensor] = {}

    # -- layers are registered on first sight (states added before any merge) --------------------
    def _register(self, operators: Mapping[str, Operator]) -> None:
        for name in sorted(operators):
            op = operators[name]
            if name in self.layers:
                if self.curve:
                    self._check_curve_splits(name, op)
                continue
            self._warn_if_slow(name, op)
            index = resolve_splits(self.splits, op.seq_len) if self.curve else None
            self._add_layer(name, op.state_size, index)

    def _check_curve_splits(self, name: str, op: Operator) -> None:
        kept = self.curve_splits[name]
        last = op.seq_len - 1
        now = None if int(kept.max()) > last else resolve_splits(self.splits, op.seq_len)
        if now is None or not torch.equal(now, kept):
            raise ValueError(
                f"ESSMetric(curve=True): layer {name!r} was first seen with splits {_short(kept)} and "
                f"now has L = {op.seq_len}, which gives splits {_short(now) if now is not None else 'not '}"
                f"{'' if now is not None else 'containing them'}; curves of different split positions "
                "cannot be averaged. Pass fixed split indices valid for every length (splits=[...]), "
                "use one metric per sequence length, or curve=False")

    def _add_layer(self, name: str, tss: int | None, curve_index: torch.Tensor | None) -> None:
        """States of one layer, named after the layer itself (the same on every rank)."""
        digest = hashlib.sha1(name.encode()).hexdigest()[:8]
        prefix = "layer_" + re.sub(r"\W", "_", name) + "_" + digest
        self.layers[name] = prefix
        self.tss[name] = tss
        zero = torch.tensor(0.0, dtype=torch.float64, device=self.device)
        for stat in ("count", "samples", "curve_count"):
            self.add_state(f"{prefix}_{stat}", zero.clone(), dist_reduce_fx="sum")
        for kind in self.kinds:
            for stat in _STAT_NAMES:
                self.add_state(f"{prefix}_{kind}_{stat}", zero.clone(), dist_reduce_fx="sum")
        if curve_index is not None:
            self.curve_splits[name] = curve_index
            for kind in self.kinds:
                self.add_state(f"{prefix}_{kind}_curve_sum",
                               torch.zeros(curve_index.numel(), dtype=torch.float64, device=self.device),
                               dist_reduce_fx="sum")

    def _layer_info(self) -> dict[str, tuple[int | None, list[int] | None]]:
        curves = {name: index.tolist() for name, index in self.curve_splits.items()}
        return {name: (self.tss[name], curves.get(name)) for name in self.layers}

    def _adopt_layers(self, info: Mapping[str, tuple[int | None, list[int] | None]]) -> None:
        """Register the layers another metric (or rank) has seen, with zero statistics."""
        for name in sorted(info):
            tss, index = info[name]
            if name not in self.layers:
                self._add_layer(name, tss, None if index is None else torch.tensor(index))
            elif index is not None and name in self.curve_splits:
                own = self.curve_splits[name]
                if index != own.tolist():
                    raise ValueError(
                        f"ESSMetric(curve=True): layer {name!r} has curves at splits {_short(own)} here "
                        f"and at {_short(torch.tensor(index))} in the metric it meets; curves of "
                        "different split positions cannot be added (pass fixed splits=[...])")
        # every rank then holds the same states in the same order, so collectives pair them right
        for registry in (self._defaults, self._reductions, self._persistent):
            ordered = dict(sorted(registry.items()))
            registry.clear()
            registry.update(ordered)

    def sync(self, dist_sync_fn: Any = None, process_group: Any = None, should_sync: bool = True,
             distributed_available: Any = None) -> None:
        """Before torchmetrics syncs the states, every rank learns the layers the others saw (a rank
        with no update, or one that met the layers in another order, still pairs its sums right)."""
        available = distributed_available or self.distributed_available_fn
        if should_sync and not self._is_synced and callable(available) and available():
            import torch.distributed as dist

            group = process_group or self.process_group
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, self._layer_info(), group=group)
            for info in gathered:
                self._adopt_layers(info)
        super().sync(dist_sync_fn, process_group, should_sync, distributed_available)

    def reset(self) -> None:
        """Zero every statistic; with ``curve=True`` also forget the layers, so the next update may
        bring another sequence length (other split positions)."""
        super().reset()
        if self.curve:
            for prefix in self.layers.values():
                for state in [k for k in self._defaults if k.startswith(prefix + "_")]:
                    for registry in (self._defaults, self._reductions, self._persistent):
                        registry.pop(state, None)
                    delattr(self, state)
            self.layers, self.tss, self.curve_splits = {}, {}, {}

    def merge_state(self, incoming_state: Any) -> None:
        """Merge another ``ESSMetric`` (or its state dict) into this one; layers it has and this one
        lacks are added first."""
        if isinstance(incoming_state, ESSMetric):
            self._adopt_layers(incoming_state._layer_info())
        super().merge_state(incoming_state)

    def get_extra_state(self) -> dict[str, Any]:
        return {"layers": self._layer_info()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._adopt_layers(state.get("layers", {}))

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        extra = state_dict.get(prefix + "_extra_state")
        if isinstance(extra, dict):  # create the layers' states before torchmetrics loads them
            self._adopt_layers(extra.get("layers", {}))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _warn_if_slow(self, name: str, op: Operator) -> None:
        if self.splits is None and _is_long_dense(op):
            warn_user(
                f"ESSMetric: layer {name!r} (L = {op.seq_len}) takes the O(L^4) dense route, and "
                f"every update evaluates all {op.seq_len - 1} splits; pass "
                f"splits={SAMPLED_DENSE_SPLITS} (evenly spaced) for a much faster estimate")

    @staticmethod
    def _as_dict(operators: Operator | torch.Tensor | Mapping[str, Any]) -> dict[str, Operator]:
        if isinstance(operators, Mapping):
            if not operators:
                raise ValueError("operators is an empty dict; capture_operators found no layer?")
            return {str(k): as_operator(v, f"operators[{k!r}]") for k, v in operators.items()}
        return {"operator": as_operator(operators)}

    def forward(self, operators: Any) -> Any:
        self._register(self._as_dict(operators))
        return super().forward(operators)

    def update(self, operators: Operator | torch.Tensor | Mapping[str, Operator]) -> None:
        """Accumulate the ESS statistics of one operator or a dict of them."""
        operators = self._as_dict(operators)
        self._register(operators)
        for name, op in operators.items():
            prefix = self.layers[name]
            with torch.no_grad():  # a diagnostic: never the differentiable route, even under forward()
                stats = _ess_update(op, self.kinds, splits=self.splits, tol=self.tol,
                                    relative=self.relative)
            for stat in ("count", "samples", "curve_count"):
                self._add(f"{prefix}_{stat}", stats[stat])
            for kind in self.kinds:
                for stat in _STAT_NAMES:
                    self._add(f"{prefix}_{kind}_{stat}", stats[f"{kind}_{stat}"])
                if self.curve:
                    self._add(f"{prefix}_{kind}_curve_sum", stats[f"{kind}_curve_sum"])

    def _add(self, state: str, value: torch.Tensor) -> None:
        current = getattr(self, state)  # on the metric's device: no host synchronisation when it is
        setattr(self, state, current + value.to(current.device, current.dtype))  # the model's

    def compute(self) -> dict[str, torch.Tensor]:
        """The flat dict of results (see the class docstring)."""
        out: dict[str, torch.Tensor] = {}
        for position, kind in enumerate(self.kinds):
            suffix = "" if position == 0 else f"_{kind}"
            totals, utils = [], []
            for name, prefix in self.layers.items():
                stats = {s: getattr(self, f"{prefix}_{s}") for s in ("count", "samples", "curve_count")}
                for stat in _STAT_NAMES:
                    stats[f"{kind}_{stat}"] = getattr(self, f"{prefix}_{kind}_{stat}")
                stats[f"{kind}_curve_sum"] = (getattr(self, f"{prefix}_{kind}_curve_sum")
                                              if self.curve else torch.zeros(()))
                if float(stats["count"]) == 0:
                    continue
                values = _ess_compute(stats, kind)
                out[f"{name}/ess{suffix}"] = values["ess"]
                out[f"{name}/total_ess{suffix}"] = values["total_ess"]
                out[f"{name}/utilization{suffix}"] = values["utilization"]
                if self.curve:
                    out[f"{name}/curve{suffix}"] = values["curve"]
                totals.append(values["total_ess"])
                utils.append(values["utilization"])
            for name in self.layers:
                if position == 0 and self.tss[name] is not None and f"{name}/ess" in out:
                    out[f"{name}/tss"] = torch.tensor(float(self.tss[name]), dtype=torch.float64)
            if totals:
                out[f"ess/total{suffix}"] = torch.stack(totals).sum()
                out[f"ess/mean_utilization{suffix}"] = torch.stack(utils).mean()
        return out

    def plot(self, val: dict[str, torch.Tensor] | None = None, ax: Any = None) -> tuple[Any, Any]:
        """ESS curves per layer (with ``curve=True``) or utilization bars; returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        val = self.compute() if val is None else val
        fig, ax = (plt.subplots(figsize=(7, 4)) if ax is None else (ax.get_figure(), ax))
        curves = {k[: -len("/curve")]: v for k, v in val.items() if k.endswith("/curve")}
        if curves:
            for name, values in curves.items():
                ax.plot(self.curve_splits[name].numpy(), values.numpy(), label=name)
            ax.set(xlabel="split index i", ylabel="mean ESS", title="ESS over the sequence")
            ax.legend(fontsize=8)
        else:
            names = [k[: -len("/utilization")] for k in val if k.endswith("/utilization")]
            ax.bar(range(len(names)), [float(val[f"{n}/utilization"]) for n in names])
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
            ax.set(ylabel="utilization (ESS / TSS)", ylim=(0, 1.05), title="state utilization")
        fig.tight_layout()
        return fig, ax


def _short(index: torch.Tensor) -> str:
    values = index.tolist()
    if len(values) <= 6:
        return str(values)
    return f"[{values[0]}, {values[1]}, ..., {values[-1]}] ({len(values)})"
