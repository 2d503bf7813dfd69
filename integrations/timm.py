"""timm: ``create_optimizer_v2`` param groups wrapped by ``ESSOptimizer`` in one call; ESS-aware
initialization with ``timm.models.named_apply``."""

from __future__ import annotations

from typing import Any

from timm.models import named_apply
from timm.optim import create_optimizer_v2
from torch import nn

from ess_reg.optim import ESSOptimizer
from ess_reg.regularizer import ESSRegularizer
from init_schemes import init_weights_ess


def create_ess_optimizer(
    model: nn.Module,
    regularizer: ESSRegularizer | dict[str, Any] | None = None,
    opt: str = "adamw",
    lr: float | None = None,
    weight_decay: float = 0.0,
    **kwargs: Any,
) -> ESSOptimizer:
    """``create_optimizer_v2(model, opt, lr, weight_decay, **kwargs)`` (timm's param groups, no
    weight decay on biases and norms, layer decay ...) wrapped by :class:`ESSOptimizer`.

    ``regularizer``: an :class:`ESSRegularizer`, or keyword arguments for one (default ``{}``).
    """
    if regularizer is None or isinstance(regularizer, dict):
        regularizer = ESSRegularizer(model, **(regularizer or {}))
    base = create_optimizer_v2(model, opt=opt, lr=lr, weight_decay=weight_decay, **kwargs)
    return ESSOptimizer(base, regularizer)


def init_ess_(model: nn.Module) -> nn.Module:
    """``named_apply(init_weights_ess, model)``: each recognised mixer gets its reference scheme."""
    return named_apply(init_weights_ess, model)


__all__ = ["create_ess_optimizer", "init_ess_", "init_weights_ess"]
