"""pytorch-optimizer: ``create_optimizer(..., ess=regularizer)``, composing with its wrappers."""

from __future__ import annotations

from typing import Any

import pytorch_optimizer
from torch import nn
from torch.optim import Optimizer

from ess_reg.optim import ESSOptimizer
from ess_reg.regularizer import ESSRegularizer


def create_optimizer(
    model: nn.Module,
    optimizer_name: str,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    *,
    ess: ESSRegularizer | dict[str, Any] | None = None,
    **kwargs: Any,
) -> Optimizer:
    """``pytorch_optimizer.create_optimizer(model, optimizer_name, lr, weight_decay, **kwargs)``
    (with ``use_lookahead``, ``use_orthograd`` and friends), then wrapped by :class:`ESSOptimizer`
    when ``ess`` is given (an :class:`ESSRegularizer` or keyword arguments for one)."""
    base = pytorch_optimizer.create_optimizer(model, optimizer_name, lr=lr, weight_decay=weight_decay,
                                              **kwargs)
    if ess is None:
        return base
    if isinstance(ess, dict):
        ess = ESSRegularizer(model, **ess)
    return ESSOptimizer(base, ess)


def get_supported_optimizers(filters: str | list[str] | None = None) -> list[str]:
    """pytorch-optimizer's names (fnmatch ``filters``), all usable with ``ess=``."""
    return pytorch_optimizer.get_supported_optimizers(filters)


__all__ = ["create_optimizer", "get_supported_optimizers"]
