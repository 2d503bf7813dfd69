"""``ESSOptimizer``: an optimizer wrapper that applies an ``ESSRegularizer`` in the backward pass."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from ess_reg.regularizer import ESSRegularizer


def load_optimizer(optimizer: Optimizer | type[Optimizer] | str, **kwargs: Any) -> Optimizer:
    """An optimizer instance from an instance (returned as is), a class or a pytorch-optimizer name.

    A class or a name needs ``params=`` in ``kwargs``; the other kwargs go to its constructor.
    """
    if isinstance(optimizer, Optimizer):
        return optimizer
    if isinstance(optimizer, str):
        try:
            from pytorch_optimizer import load_optimizer as load_by_name
        except ImportError as error:  # pragma: no cover - a hard dependency
            raise ImportError("loading an optimizer by name needs pytorch-optimizer: "
                              "pip install pytorch-optimizer") from error
        optimizer = load_by_name(optimizer)
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        if "params" not in kwargs:
            raise ValueError(f"need to pass params= to build {optimizer.__name__}")
        return optimizer(**kwargs)
    raise TypeError(
        f"optimizer must be an Optimizer instance, class or name, got {type(optimizer).__name__}"
    )


class ESSOptimizer(Optimizer):
    """Wraps an optimizer so that an :class:`ESSRegularizer` acts with no change to the loop.

    The regularizer is put in backward-pass mode (:meth:`ESSRegularizer.attach`): ``loss.backward()``
    adds the ESS penalty's gradient, and ``step()`` advances the regularizer's schedule
    (``every_n_steps``, warm-up). A training loop stays
    ``loss = criterion(model(x), y); loss.backward(); opt.step(); opt.zero_grad()``.

    In the style of pytorch-optimizer's wrappers: ``optimizer`` is an instance, a class or a
    pytorch-optimizer name (then ``params=`` and its hyper-parameters go in ``kwargs``);
    ``param_groups``, ``state`` and ``defaults`` are the base optimizer's (the same objects, so LR
    schedulers work); ``step(closure)`` runs the closure (whose backward applies the penalty), then
    steps the base optimizer; ``state_dict`` nests the base's and adds the schedule.

    Args:
        grad_scaler: a ``torch.amp.GradScaler`` when training with fp16 loss scaling, so that the
            injected gradient is scaled like the loss.
    """

    def __init__(
        self,
        optimizer: Optimizer | type[Optimizer] | str,
        regularizer: ESSRegularizer,
        *,
        grad_scaler: Any = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(regularizer, ESSRegularizer):
            raise TypeError(f"regularizer must be an ESSRegularizer, got {type(regularizer).__name__}")
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self.optimizer = load_optimizer(optimizer, **kwargs)
        self.regularizer = regularizer.attach(grad_scaler)
        self._patch_step_function()

    # -- proxies ------------------------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.optimizer.defaults = value

    def __str__(self) -> str:
        return "ESSOptimizer"

    def __repr__(self) -> str:
        return f"ESSOptimizer({self.optimizer!r}, {self.regularizer!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer, "regularizer": self.regularizer,
                "grad_scaler": self.regularizer._grad_scaler}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["optimizer"], state["regularizer"], grad_scaler=state.get("grad_scaler"))

    # -- optimizer API --------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Step the base optimizer with ``closure`` (forward and backward: the penalty's gradient is
        added there; an optimizer such as ``torch.optim.LBFGS`` may call it several times), then
        advance the regularizer's schedule."""
        if closure is None:
            loss = self.optimizer.step()
        else:
            def with_grad() -> Any:
                with torch.enable_grad():
                    return closure()

            loss = self.optimizer.step(with_grad)
        self.regularizer.advance()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return {"base_optimizer": self.optimizer.state_dict(),
                "ess": self.regularizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "base_optimizer" not in state_dict or "ess" not in state_dict:
            raise ValueError("not an ESSOptimizer state dict (expected keys 'base_optimizer' and 'ess')")
        self.optimizer.load_state_dict(state_dict["base_optimizer"])
        self.regularizer.load_state_dict(state_dict["ess"])
