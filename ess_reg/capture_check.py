"""``check_capture``: does each captured operator reproduce what its layer computes?"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ess_reg._warnings import warn_user
from ess_reg.capture import _CHECKING, Capture, _entry_for, recognised_modules
from ess_reg.functional.memory import require_fits
from ess_reg.operators import NotCausalError


def check_capture(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, float]:
    """Run ``model(*args, **kwargs)`` once and, for every recognised layer, compare what the layer
    computed with what its captured operator gives: ``max |readout(T u) - y| / max |y|``.

    Use it after writing an extractor (:func:`ess_reg.register_extractor`) or upgrading a library
    whose layers ess-reg reads: errors near the compute dtype's rounding (``1e-6`` in float32,
    ``1e-12`` in float64) mean the operator is the layer's. The model runs in eval mode (dropout
    off; training flags are restored afterwards) without gradients.

    Returns:
        ``{layer name: max relative error}`` for every layer whose extractor returns a
        :class:`ess_reg.Capture`. Layers whose extractor returns a bare operator (nothing to
        compare with) and layers that computed a non-causal operator in this call are left out
        with a warning naming them.

    Raises:
        ValueError: if ``model`` contains no recognised module.
        MemoryError: if a layer's dense operator (``[B, C, L, L]`` in float64) exceeds the memory
            budget (:func:`ess_reg.set_memory_budget`); the message names the layer.
    """
    targets = recognised_modules(model, required=True)
    results: dict[str, Capture] = {}
    bare: list[str] = []
    handles = []
    for name, module in targets.items():
        entry = _entry_for(module)
        if entry.prepare is not None:
            handles.append(module.register_forward_pre_hook(lambda m, a, e=entry: e.prepare(m)))
        handles.append(module.register_forward_hook(_Keep(name, entry, results, bare), with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        _CHECKING[0] = True
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        _CHECKING[0] = False
        for handle in handles:
            handle.remove()
        for m, training in modes.items():
            m.train(training)
    if bare:
        warn_user(f"check_capture cannot verify {', '.join(map(repr, bare))}: the extractor "
                      "returns a bare operator; return ess_reg.Capture(operator, u, y, readout) to "
                      "make it checkable")
    with torch.no_grad():
        return {name: _relative_error(name, capture) for name, capture in results.items()}


class _Keep:
    def __init__(self, name: str, entry: Any, results: dict[str, Capture], bare: list[str]) -> None:
        self.name, self.entry, self.results, self.bare = name, entry, results, bare

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        try:
            result = self.entry.extract(module, args, kwargs, output)
        except NotCausalError as error:
            warn_user(f"check_capture leaves out layer {self.name!r} ({type(module).__name__}): "
                          f"{error}")
            return
        if isinstance(result, Capture):
            self.results.setdefault(self.name, result)  # a layer called twice: its first call
        elif self.name not in self.bare:
            self.bare.append(self.name)


def _relative_error(name: str, capture: Capture) -> float:
    """``max |readout(T u) - y| / max |y|``, ``T u`` formed in float64 (complex: its real part)."""
    u = capture.u
    operator = capture.operator
    complex_ = operator.dtype.is_complex or getattr(operator, "is_complex", False)
    matrices = math.prod(operator.shape) * operator.seq_len ** 2
    require_fits(matrices * (16 if complex_ else 8) + 2 * u.numel() * 8, operator.device,
                 f"check_capture of layer {name!r} (it forms T densely: {tuple(operator.shape)} "
                 f"matrices of {operator.seq_len} x {operator.seq_len} in float64)",
                 "check on fewer examples or a shorter sequence (a batch of 1 and a few hundred "
                 "tokens verify an extractor as well as a full batch)")
    mixed = capture.operator.dense(torch.float64) @ u.to(torch.float64)
    if capture.readout is not None:
        mixed = capture.readout(mixed.to(u.dtype))
    y = capture.y
    wide = torch.promote_types(y.dtype, torch.float64)
    difference = (mixed.to(wide) - y.to(wide)).abs().max()
    scale = y.to(wide).abs().max()
    return float(difference / scale) if scale > 0 else float(difference)
