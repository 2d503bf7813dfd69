"""The capture registry: hooks that turn a module's forward into an operator.

``register_extractor(module_type, fn)`` teaches ess-reg a module type; ``capture_operators`` runs a
forward pass with hooks on every recognised module and returns their operators by module name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn
from torch.utils.hooks import RemovableHandle

from ess_reg._class_lookup import lookup_by_class
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
    _load_integrations()
    return sorted(f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY)


def recognised_modules(model: nn.Module, *, required: bool = False) -> dict[str, nn.Module]:
    """Modules of ``model`` the registry recognises, by name (``""`` for the model itself).

    With ``required=True`` a model without any raises the one "no recognised module" error.
    """
    _load_integrations()
    found = {name: m for name, m in model.named_modules() if _entry_for(m) is not None}
    if required and not found:
        raise ValueError(
            f"{type(model).__name__} contains no module ess-reg recognises; supported types: "
            f"{', '.join(supported_types())}. Teach it others with ess_reg.register_extractor()"
        )
    return found


def capture_operators(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Operator]:
    """Run ``model(*args, **kwargs)`` and return the operator of every recognised mixer.

    Keys are module names as in ``model.named_modules()``. Operators stay attached to the autograd
    graph when gradients are enabled. Hooks are removed afterwards, even if the forward raises.

    Raises:
        ValueError: if ``model`` contains no recognised module (the message lists what is supported).
    """
    targets = recognised_modules(model, required=True)
    operators: dict[str, Operator] = {}
    handles = hook_operators(targets, lambda name, module, op, output: operators.__setitem__(name, op))
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return operators


def _always() -> bool:
    return True


OperatorCallback = Callable[[str, nn.Module, Operator, Any], Any]


def hook_operators(
    modules: dict[str, nn.Module],
    callback: OperatorCallback,
    *,
    active: Callable[[], bool] = _always,
) -> list[RemovableHandle]:
    """Persistent hooks: after each forward of a module, ``callback(name, module, operator, output)``.

    Only forwards that start while ``active()`` is true build an operator. A callback that returns
    something other than ``None`` replaces the module's output. Returns the hook handles (call
    ``.remove()`` on each to detach).
    """
    handles: list[RemovableHandle] = []
    for name, module in modules.items():
        entry = _entry_for(module)
        if entry is None:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is not recognised; supported types: "
                f"{', '.join(supported_types())}"
            )
        pre = _ArmHook(entry, active)
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(_ExtractHook(name, entry, pre, callback),
                                                    with_kwargs=True))
    return handles


def _never() -> bool:
    return False


class _ArmHook:
    """Pre-forward hook: decides whether this forward builds an operator (picklable).

    A deep copy of a hooked model (an EMA or SWA copy) gets an inert copy of the hook: the copy
    never builds operators, and the regularizer or metric behind the hook is not copied with it.
    """

    def __init__(self, entry: _Entry, active: Callable[[], bool]) -> None:
        self.entry, self.active, self.armed = entry, active, False

    def __deepcopy__(self, memo: dict) -> _ArmHook:
        return _ArmHook(self.entry, _never)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.armed = bool(self.active())
        if self.armed and self.entry.prepare is not None:
            self.entry.prepare(module)


class _ExtractHook:
    """Forward hook: extracts the operator and hands it to the callback (picklable)."""

    def __init__(self, name: str, entry: _Entry, arm: _ArmHook, callback: OperatorCallback) -> None:
        self.name, self.entry, self.arm, self.callback = name, entry, arm, callback

    def __deepcopy__(self, memo: dict) -> _ExtractHook:
        arm = memo.get(id(self.arm)) or self.arm.__deepcopy__(memo)
        return _ExtractHook(self.name, self.entry, arm, _ignore)

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.arm.armed:
            return None
        self.arm.armed = False
        return self.callback(self.name, module, self.entry.extract(module, args, kwargs, output), output)


def _ignore(name: str, module: nn.Module, operator: Operator, output: Any) -> None:
    return None


def _load_integrations() -> None:
    """Register the third-party extractors of packages this process has imported (cheap)."""
    try:
        from integrations.third_party import register_available
    except ImportError:  # the integrations package is optional at runtime
        return
    register_available()


def _entry_for(module: nn.Module) -> _Entry | None:
    return lookup_by_class(_REGISTRY, module)


def _mixer_operator(module: SequenceMixer, args, kwargs, output) -> Operator:
    # taken off the module by its last reader: nothing on a module may hold an autograd graph
    return module.take_operator()


register_extractor(SequenceMixer, _mixer_operator, prepare=SequenceMixer.request_capture)
