"""The capture registry: hooks that turn a module's forward into an operator.

``register_extractor(module_type, fn)`` teaches ess-reg a module type; ``capture_operators`` runs a
forward pass with hooks on every recognised module and returns their operators by module name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ess_reg.mixers import SequenceMixer
from ess_reg.operators import Operator

#: ``fn(module, args, kwargs, output) -> Operator`` called after the module's forward.
Extractor = Callable[[nn.Module, tuple, dict, Any], Operator]


@dataclass(frozen=True)
class _Entry:
    extract: Extractor
    prepare: Callable[[nn.Module], None] | None


_REGISTRY: dict[type, _Entry] = {}


def register_extractor(
    module_type: type[nn.Module],
    fn: Extractor,
    *,
    prepare: Callable[[nn.Module], None] | None = None,
) -> None:
    """Teach the registry to turn ``module_type``'s forward into an operator.

    Args:
        module_type: the module class (subclasses match too; the most specific entry wins).
        fn: ``fn(module, args, kwargs, output) -> Operator``, called in a forward hook.
        prepare: optional ``prepare(module)`` called in a pre-forward hook (e.g. to ask the module
            to keep intermediate tensors).
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(fn):
        raise TypeError("fn must be callable as fn(module, args, kwargs, output) -> Operator")
    _REGISTRY[module_type] = _Entry(fn, prepare)


def find_extractor(module: nn.Module) -> Extractor | None:
    """The extractor registered for ``module``'s class (or its nearest base), if any."""
    entry = _entry_for(module)
    return None if entry is None else entry.extract


def supported_types() -> list[str]:
    """Names of the module types the registry recognises."""
    return sorted(f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY)


def recognised_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Modules of ``model`` the registry recognises, by name (``""`` for the model itself)."""
    return {name: m for name, m in model.named_modules() if _entry_for(m) is not None}


def capture_operators(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Operator]:
    """Run ``model(*args, **kwargs)`` and return the operator of every recognised mixer.

    Keys are module names as in ``model.named_modules()``. Operators stay attached to the autograd
    graph when gradients are enabled. Hooks are removed afterwards, even if the forward raises.

    Raises:
        ValueError: if ``model`` contains no recognised module (the message lists what is supported).
    """
    targets = recognised_modules(model)
    if not targets:
        raise ValueError(
            f"{type(model).__name__} contains no module ess-reg recognises; supported types: "
            f"{', '.join(supported_types())}. Teach it others with ess_reg.register_extractor()"
        )
    operators: dict[str, Operator] = {}
    handles = []
    try:
        for name, module in targets.items():
            entry = _entry_for(module)
            if entry.prepare is not None:
                handles.append(module.register_forward_pre_hook(
                    lambda m, a, prepare=entry.prepare: prepare(m)))
            handles.append(module.register_forward_hook(
                _store(name, entry.extract, operators), with_kwargs=True))
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return operators


def _store(name: str, extract: Extractor, sink: dict[str, Operator]):
    def hook(module, args, kwargs, output):
        sink[name] = extract(module, args, kwargs, output)
    return hook


def _entry_for(module: nn.Module) -> _Entry | None:
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None


def _mixer_operator(module: SequenceMixer, args, kwargs, output) -> Operator:
    operator = module.captured_operator
    module.captured_operator = None
    return operator


register_extractor(SequenceMixer, _mixer_operator, prepare=SequenceMixer.request_capture)
