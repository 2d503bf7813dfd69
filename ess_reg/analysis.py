"""Per-layer ESS reports of whole models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from ess_reg._table import format_table
from ess_reg.capture import capture_operators
from ess_reg.diagnostics import COLLAPSED_BELOW, SATURATED_AT, layer_status
from ess_reg.functional import (
    entropy_ess,
    resolve_splits,
    split_spectrum,
    tolerance_ess,
    utilization_from_curve,
)
from ess_reg.functional.ess import SAMPLED_DENSE_SPLITS, _is_long_dense
from ess_reg.sizing import needed_from_spectrum


@dataclass
class LayerReport:
    """ESS of one layer on a batch of inputs.

    ``entropy_ess`` / ``tolerance_ess``: average ESS per channel (mean over splits, channels and
    examples). ``total_ess``: summed over channels (mean over examples). ``utilization``: ESS / TSS
    (or ESS / ``min(i, L - i)`` without a finite state). ``ess_per_kv``: ``total_ess / kv_pairs``
    for MQAR. ``splits`` and ``curve``: the mean entropy-ESS at each split, for plots.
    ``sampled_by_default``: evenly spaced splits stood in for all of them (a long dense layer).
    ``needed_state``: :func:`ess_reg.state_size_needed` at its defaults (tolerance 1e-2, the 0.95
    quantile over splits, channels and examples).
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
    sampled_by_default: bool = False
    needed_state: int | None = None

    @property
    def label(self) -> str:
        return f"{self.name} ({self.mixer})"

    @property
    def verdict(self) -> str:
        """:func:`ess_reg.diagnose`'s status from the utilization: saturated, collapsed or healthy;
        a layer without a finite state (attention) at its edge bound is "full rank" (it mixes as
        many directions as a split allows, and has no state to grow)."""
        return layer_status(self.utilization, finite_state=self.tss is not None)

    @property
    def state_verdict(self) -> str:
        """One line on the state size: shrink, grow, or leave it."""
        if self.tss is None or self.needed_state is None:
            return "no finite state (attention keeps every token)"
        if self.needed_state >= self.tss:
            return f"full: needs all {self.tss} of its state at 1e-2; a larger state may help"
        if self.needed_state <= self.tss // 2:
            return f"could shrink from {self.tss} to ~{self.needed_state}"
        return f"uses most of its state ({self.needed_state} of {self.tss})"


def layer_report(
    model: nn.Module, inputs: Any, config: Any = None, *, splits: int | None = None
) -> list[LayerReport]:
    """Capture every recognised mixer of ``model`` on ``inputs`` and summarise its ESS.

    ``config`` (optional) supplies ``task`` and ``kv_pairs`` for ESS/kv. ``splits``: evenly spaced
    splits per layer; by default all of them, except that a layer without a small state (softmax
    attention, or a state as large as ``L / 2``) longer than ``LONG_DENSE_LEN`` (257) gets
    ``SAMPLED_DENSE_SPLITS`` (64; each report's ``splits`` says which were used).
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
        sampled = splits is None and _is_long_dense(op)
        index = resolve_splits(SAMPLED_DENSE_SPLITS if sampled else splits, op.seq_len)
        sigma = split_spectrum(op, splits=index).values
        curve = entropy_ess(sigma)  # [B, C, S]
        needed = needed_from_spectrum(sigma)
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
            sampled_by_default=sampled,
            needed_state=needed,
        ))
    return reports


def format_reports(reports: list[LayerReport]) -> str:
    """Plain-text table of layer reports, a legend (one line per column) and one line of advice on
    each layer's state size."""
    header = ("layer", "mixer", "TSS/ch", "needed state", "channels", "ESS ent", "ESS tol",
              "total ESS", "utilization", "verdict", "ESS/kv")
    rows = [
        (r.name, r.mixer, "-" if r.tss is None else str(r.tss),
         "-" if r.needed_state is None else str(r.needed_state), str(r.channels),
         f"{r.entropy_ess:.2f}", f"{r.tolerance_ess:.2f}", f"{r.total_ess:.1f}",
         f"{r.utilization:.3f}", r.verdict, "-" if r.ess_per_kv is None else f"{r.ess_per_kv:.2f}")
        for r in reports
    ]
    verdicts = "\n".join(f"  {r.name}: {r.state_verdict}" + (
        "; collapsed: if the task fails, reopen its memory (docs/regularizer.md, 'Which regularizer "
        "when')" if r.verdict == "collapsed" else "") for r in reports)
    no_kv = all(r.ess_per_kv is None for r in reports)
    legend = [
        "TSS/ch        theoretical state size per channel (head); '-': no finite state (attention "
        "keeps every token)",
        "needed state  tolerance-ESS at 1e-2, 0.95 quantile over splits, channels and examples: the "
        "state a smaller model of this layer would need",
        "channels      independent operators per example (channels, or heads)",
        "ESS ent       entropy-ESS per channel, mean over splits and examples",
        "ESS tol       tolerance-ESS per channel (singular values above 1e-3 of the largest)",
        "total ESS     entropy-ESS summed over channels",
        "utilization   ESS / TSS (without a finite state: ESS / min(i, L - i)), 0 to 1",
        f"verdict       saturated (utilization >= {SATURATED_AT}: grow the state), collapsed "
        f"(< {COLLAPSED_BELOW}: the state goes unused), healthy otherwise; without a finite state "
        f"'full rank' (utilization >= {SATURATED_AT}: at the edge bound, nothing to grow)",
        "ESS/kv        total ESS / key-value pairs of the MQAR task"
        + (" ('-' here: these inputs are not an MQAR task, so there is no kv count)" if no_kv else ""),
    ]
    return (format_table(header, rows) + "\n\n" + "\n".join(legend) + "\n\nstate size per layer:\n"
            + verdicts)


@dataclass
class TokenModulation:
    """ESS aligned on occurrences of a delimiter token.

    ``offsets``: split offsets ``o`` relative to each occurrence at position ``p``: split ``p + o``
    looks at inputs before ``p + o`` and outputs from ``p + o`` on, so for ``o >= 0`` every output
    in the block comes at or after the delimiter (a gate at ``p`` already acts on split ``p``).
    ``curves[layer]``: mean ESS (over channels and occurrences) at each offset, NaN where no
    occurrence reaches. ``modulation``: the relative drop ``1 - mean(after) / mean(before)`` with
    after ``o >= 0`` and before ``o < 0``; near 0 the layer ignores the delimiter, near 1 it resets
    its state there.
    """

    offsets: np.ndarray
    curves: dict[str, np.ndarray]
    modulation: dict[str, float]
    occurrences: int


def ess_around_tokens(
    model_or_operators: nn.Module | dict[str, Any],
    input_ids: torch.Tensor,
    token_id: int,
    window: int = 8,
    *,
    kind: str = "entropy",
    tol: float = 1e-3,
    relative: bool = True,
) -> TokenModulation:
    """ESS per split aligned on each occurrence of ``token_id`` (e.g. an end-of-sequence id).

    Args:
        model_or_operators: a model (its recognised mixers are captured on ``input_ids``) or a dict
            ``name -> operator`` computed on ``input_ids``.
        input_ids: ``[B, L]`` token ids.
        token_id: the delimiter.
        window: offsets ``-window .. window - 1`` around each occurrence.
        kind, tol, relative: as in :func:`ess_reg.ess_curve`. Entropy-ESS and relative
            tolerance-ESS are scale-invariant: a layer that wipes its state *uniformly* keeps the
            shape of its (now tiny) spectrum; use ``kind="tolerance", relative=False`` to see that.
    """
    from ess_reg.functional import ess_curve

    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a [B, L] tensor, got {getattr(input_ids, 'shape', input_ids)}")
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if isinstance(model_or_operators, nn.Module):
        was_training = model_or_operators.training
        model_or_operators.eval()
        try:
            with torch.no_grad():
                operators = capture_operators(model_or_operators, input_ids)
        finally:
            model_or_operators.train(was_training)
    else:
        operators = dict(model_or_operators)
    batch, length = input_ids.shape
    rows, positions = (input_ids.cpu() == token_id).nonzero(as_tuple=True)
    if rows.numel() == 0:
        raise ValueError(f"token_id {token_id} does not occur in input_ids")
    offsets = np.arange(-window, window)
    curves, modulation = {}, {}
    for name, op in operators.items():
        if op.seq_len != length or op.shape[0] != batch:
            raise ValueError(f"operator {name!r} has shape {tuple(op.shape)} and L={op.seq_len}; "
                             f"input_ids is [{batch}, {length}]")
        with torch.no_grad():
            curve_all = ess_curve(op, kind, tol=tol, relative=relative)
            per_split = curve_all.double().mean(dim=1).cpu().numpy()  # [B, L - 1]
        sums, counts = np.zeros(len(offsets)), np.zeros(len(offsets))
        for row, position in zip(rows.tolist(), positions.tolist(), strict=True):
            split = position + offsets
            valid = (split >= 1) & (split <= length - 1)
            sums[valid] += per_split[row, split[valid] - 1]
            counts[valid] += 1
        curve = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        before, after = np.nanmean(curve[offsets < 0]), np.nanmean(curve[offsets >= 0])
        curves[name] = curve
        modulation[name] = float(1 - after / before) if before > 0 else float("nan")
    return TokenModulation(offsets, curves, modulation, int(rows.numel()))
