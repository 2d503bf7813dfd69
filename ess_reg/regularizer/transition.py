"""``TransitionPenalty``: the paper's baseline, ``weight * mean ||A_t - I||_F``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ess_reg.mixers import SequenceMixer
from ess_reg.regularizer.selection import ModuleSelector, select_modules


class TransitionPenalty:
    """The paper's baseline (Appendix A): ``weight * mean ||A_t - I||_F``.

    Averaged over steps, heads (channels) and batch, then over layers, for the mixers with a state
    transition (``la``, ``wla``, ``gla``, ``s6``, ``ssd``). Pulls the transition towards the
    identity (less forgetting). Hooks the mixers like :class:`ESSRegularizer`; call it after each
    forward: ``loss = task_loss + penalty()``.
    """

    def __init__(self, model: nn.Module, weight: float = 1e-2, *, modules: ModuleSelector = None) -> None:
        if not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
        self.model, self.weight = model, float(weight)
        chosen = select_modules(model, modules)
        self.modules = {n: m for n, m in chosen.items()
                        if isinstance(m, SequenceMixer) and m.has_transition}
        if not self.modules:
            raise ValueError(
                "TransitionPenalty found no mixer with a state transition (la, wla, gla, s6, ssd) "
                f"among {sorted(chosen)}"
            )
        self.transitions: dict[str, torch.Tensor] = {}
        self.values: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(_request_transition))
            self._handles.append(module.register_forward_hook(_KeepTransition(self, name)))

    def __call__(self) -> torch.Tensor:
        """The penalty for the last forward (a scalar)."""
        if not self.transitions:
            return torch.zeros(())
        terms = []
        for name, a in self.transitions.items():
            n = self.modules[name].state_size
            if a.shape[-1] == 1:  # scalar transition a * I_N
                norm = (a[..., 0] - 1).abs() * math.sqrt(n)
            else:
                norm = torch.sqrt(((a - 1) ** 2).sum(-1) + torch.finfo(a.dtype).tiny)
            self.values[name] = norm.mean().detach()
            terms.append(norm.mean())
        self.transitions = {}
        return self.weight * torch.stack(terms).mean()

    def state_dict(self) -> dict[str, Any]:
        """Nothing to save (no schedule); for loops that checkpoint every penalty alike."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Accepts what :meth:`state_dict` gave."""

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> TransitionPenalty:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _request_transition(module: SequenceMixer, args: tuple) -> None:
    module.request_capture(operator=False, transition=True)


class _KeepTransition:
    def __init__(self, penalty: TransitionPenalty, name: str) -> None:
        self.penalty, self.name = penalty, name

    def __call__(self, module: SequenceMixer, args: tuple, output: Any) -> None:
        self.penalty.transitions[self.name] = module.captured_transition
        module.captured_transition = None
