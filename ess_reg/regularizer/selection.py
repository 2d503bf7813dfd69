"""Which recognised mixers a regularizer hooks: names, types or a predicate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from torch import nn

from ess_reg.capture import recognised_modules

ModuleSelector = Sequence[str] | type | tuple[type, ...] | Callable[[str, nn.Module], bool] | None


def select_modules(model: nn.Module, modules: ModuleSelector) -> dict[str, nn.Module]:
    """The recognised mixers of ``model`` picked by ``modules`` (names, types or a predicate)."""
    recognised = recognised_modules(model, required=True, causal_only=True)
    if modules is None:
        return recognised
    named = dict(model.named_modules())
    if isinstance(modules, type | tuple):
        chosen = {n: m for n, m in recognised.items() if isinstance(m, modules)}
    elif callable(modules):
        chosen = {n: m for n, m in recognised.items() if modules(n, m)}
    elif isinstance(modules, Iterable) and not isinstance(modules, str):
        chosen = {}
        for name in modules:
            if name not in named:
                raise ValueError(f"modules: {name!r} is not a submodule of the model; "
                                 f"recognised mixers: {sorted(recognised)}")
            if name not in recognised:
                raise ValueError(f"modules: {name!r} ({type(named[name]).__name__}) is not a "
                                 f"recognised mixer; recognised: {sorted(recognised)}")
            chosen[name] = named[name]
    else:
        raise TypeError("modules must be None, a list of module names, a module type (or tuple of "
                        "types) or a predicate f(name, module) -> bool")
    if not chosen:
        raise ValueError(f"modules selected no recognised mixer; recognised: {sorted(recognised)}")
    return chosen
