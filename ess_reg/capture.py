"""The capture registry: hooks that turn a module's forward into an operator.

``register_extractor(module_type, fn)`` teaches ess-reg a module type; ``capture_operators`` runs a
forward pass with hooks on every recognised module and returns their operators by module name.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ess_reg._class_lookup import lookup_by_class
from ess_reg._warnings import warn_user
from ess_reg.mixers import SequenceMixer
from ess_reg.operators import NotCausalError, Operator


@dataclass(frozen=True)
class Capture:
    """An extractor's full answer: the operator and the sequences it was checked on.

    ``readout(T u)`` (``T u`` itself when ``readout`` is None) must equal ``y``, what the layer
    returned, so :func:`ess_reg.check_capture` can verify the extractor on any input.

    Attributes:
        operator: the layer's causal operator, leading dims ``[B, C]`` (batch optional).
        u: ``[B, C, L, P]``: the sequence ``T`` acts on (broadcast against the operator's dims).
        y: what the layer computed from it (the layer's own output, any shape).
        readout: maps ``T u`` ``[B, C, L, P]`` to ``y``'s form with the layer's own weights (the
            output projection, gates, skips, norms); None when ``y`` is ``T u``.
    """

    operator: Operator
    u: torch.Tensor
    y: torch.Tensor
    readout: Callable[[torch.Tensor], torch.Tensor] | None = None


#: ``fn(module, args, kwargs, output) -> Operator | Capture`` called after the module's forward.
Extractor = Callable[[nn.Module, tuple, dict, Any], "Operator | Capture"]


#: ``bidirectional(module) -> reason or None``: whether a module is known, before any call, to compute
#: a non-causal operator (e.g. the attention of a vision transformer).
Bidirectional = Callable[[nn.Module], str | None]


@dataclass(frozen=True)
class _Entry:
    extract: Extractor
    prepare: Callable[[nn.Module], None] | None
    bidirectional: Bidirectional | None = None


_REGISTRY: dict[type, _Entry] = {}
#: ``(predicate, entry)`` pairs consulted, in order, for modules no registered class matches
_RULES: list[tuple[Callable[[nn.Module], bool], _Entry]] = []


def register_extractor(
    module_type: type[nn.Module],
    fn: Extractor,
    *,
    prepare: Callable[[nn.Module], None] | None = None,
    bidirectional: Bidirectional | None = None,
) -> None:
    """Teach the registry to turn ``module_type``'s forward into an operator.

    Args:
        module_type: the module class (subclasses match too; the most specific entry wins).
        fn: ``fn(module, args, kwargs, output) -> Operator``, called in a forward hook; it may
            return a :class:`Capture` (the operator with the sequence it acts on and what the
            layer computed) so that :func:`ess_reg.check_capture` can verify it. For a call
            that computes a non-causal operator it raises :class:`ess_reg.NotCausalError`: the
            layer is then left out (with a warning naming it), never measured.
        prepare: optional ``prepare(module)`` called in a pre-forward hook (e.g. to ask the module
            to keep intermediate tensors).
        bidirectional: optional ``bidirectional(module) -> reason or None``: modules known to be
            non-causal before any call; regularizers and ``ess_init`` leave them out at
            construction, with one warning.
    """
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be an nn.Module subclass, got {module_type!r}")
    if not callable(fn):
        raise TypeError("fn must be callable as fn(module, args, kwargs, output) -> Operator")
    _REGISTRY[module_type] = _Entry(fn, prepare, bidirectional)


def register_extractor_rule(
    predicate: Callable[[nn.Module], bool],
    fn: Extractor,
    *,
    prepare: Callable[[nn.Module], None] | None = None,
    bidirectional: Bidirectional | None = None,
) -> None:
    """Like :func:`register_extractor`, for every module ``predicate(module)`` accepts: a family of
    classes recognised by their structure (e.g. the eager attention modules of Hugging Face models
    that return their attention weights). Registered classes take precedence; rules are tried in
    the order they were registered."""
    if not callable(predicate):
        raise TypeError("predicate must be callable as predicate(module) -> bool")
    if not callable(fn):
        raise TypeError("fn must be callable as fn(module, args, kwargs, output) -> Operator")
    _RULES.append((predicate, _Entry(fn, prepare, bidirectional)))


def find_extractor(module: nn.Module) -> Extractor | None:
    """The extractor registered for ``module``'s class (or its nearest base), if any."""
    entry = _entry_for(module)
    return None if entry is None else entry.extract


def supported_types() -> list[str]:
    """Names of the module types the registry recognises."""
    _load_integrations()
    names = sorted(f"{t.__module__}.{t.__qualname__}" for t in _REGISTRY)
    return names + [_rule_name(predicate) for predicate, _ in _RULES]


def _rule_name(predicate: Callable[[nn.Module], bool]) -> str:
    doc = (predicate.__doc__ or "").strip().splitlines()
    if not doc:
        return getattr(predicate, "__qualname__", repr(predicate))
    return doc[0].rstrip(".").replace("``", "")  # reST literals read as plain text in a message


def recognised_modules(model: nn.Module, *, required: bool = False,
                       causal_only: bool = False) -> dict[str, nn.Module]:
    """Modules of ``model`` the registry recognises, by name (``""`` for the model itself).

    With ``required=True`` a model without any raises the one "no recognised module" error. With
    ``causal_only=True`` modules known to be bidirectional are left out with one warning naming
    them (and, if ``required``, a model with nothing causal left is an error).
    """
    _load_integrations()
    found = {name: m for name, m in model.named_modules() if _entry_for(m) is not None}
    if required and not found:
        raise ValueError(
            f"{type(model).__name__} contains no module ess-reg recognises; supported types: "
            f"{', '.join(supported_types())}. Teach it others with ess_reg.register_extractor()"
        )
    if not causal_only:
        return found
    reasons = {name: _bidirectional_reason(m) for name, m in found.items()}
    left_out = {name: why for name, why in reasons.items() if why is not None}
    causal = {name: m for name, m in found.items() if name not in left_out}
    if left_out and required and not causal:
        raise ValueError(
            f"every recognised module of {type(model).__name__} is bidirectional, and ESS needs a "
            f"causal operator: {_describe(left_out)}")
    if left_out:
        warn_user(f"ess-reg leaves out {len(left_out)} bidirectional layer(s) (ESS needs a causal "
                      f"operator): {_describe(left_out)}")
    return causal


def _bidirectional_reason(module: nn.Module) -> str | None:
    entry = _entry_for(module)
    return None if entry is None or entry.bidirectional is None else entry.bidirectional(module)


def _describe(reasons: dict[str, str]) -> str:
    names = ", ".join(repr(n) for n in list(reasons)[:4]) + (", ..." if len(reasons) > 4 else "")
    return f"{names} ({next(iter(reasons.values()))})"


def capture_operators(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Operator]:
    """Run ``model(*args, **kwargs)`` and return the operator of every recognised mixer.

    Keys are module names as in ``model.named_modules()``. Operators stay attached to the autograd
    graph when gradients are enabled. Hooks are removed afterwards, even if the forward raises.

    Raises:
        ValueError: if ``model`` contains no recognised module (the message lists what is supported).
    """
    targets = recognised_modules(model, required=True)
    operators: dict[str, Operator] = {}
    left_out: dict[str, str] = {}
    handles = hook_operators(targets, lambda name, module, op, output: operators.__setitem__(name, op),
                             on_not_causal=lambda name, error: left_out.__setitem__(name, str(error)))
    try:
        model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if left_out and not operators:
        raise ValueError(f"every recognised layer of {type(model).__name__} computed a non-causal "
                         f"operator in this call, and ESS needs a causal one: {_describe(left_out)}")
    return operators


def _always() -> bool:
    return True


OperatorCallback = Callable[[str, nn.Module, Operator, Any], Any]


def hook_operators(
    modules: dict[str, nn.Module],
    callback: OperatorCallback,
    *,
    active: Callable[[], bool] = _always,
    replay: OperatorCallback | None = None,
    reentrant_error: str | None = None,
    on_not_causal: Callable[[str, NotCausalError], None] | None = None,
) -> list[RemovableHandle]:
    """Persistent hooks: after each forward of a module, ``callback(name, module, operator, output)``.

    Only forwards that start while ``active()`` is true build an operator. A callback that returns
    something other than ``None`` replaces the module's output. Returns the hook handles (call
    ``.remove()`` on each to detach).

    Activation checkpointing runs a module's forward again inside the backward pass. Such a
    recomputation repeats the original forward's decision (so the checkpoint sees the same saved
    tensors) and goes to ``replay`` (default: ignored) instead of ``callback``. A recomputation of
    a forward that ran without gradients is reentrant checkpointing (``use_reentrant=True``), whose
    forward the hooks could not capture: with ``reentrant_error`` set it raises that message.

    A call whose extractor raises :class:`NotCausalError` (a bidirectional call) builds no
    operator: the layer is left out of that forward with a warning naming it, and
    ``on_not_causal(name, error)`` is told.
    """
    handles: list[RemovableHandle] = []
    for name, module in modules.items():
        entry = _entry_for(module)
        if entry is None:
            raise ValueError(
                f"module {name!r} ({type(module).__name__}) is not recognised; supported types: "
                f"{', '.join(supported_types())}"
            )
        pre = _ArmHook(name, entry, active, reentrant_error)
        handles.append(module.register_forward_pre_hook(pre))
        extract = _ExtractHook(name, entry, pre, callback, replay, on_not_causal)
        # first among the module's hooks (a user's hook that raises cannot strand the operator on
        # the module), and also called when the forward raises, to disarm
        handles.append(module.register_forward_hook(extract, with_kwargs=True, prepend=True,
                                                    always_call=True))
    return handles


def _never() -> bool:
    return False


def recomputing() -> bool:
    """Whether a module forward runs inside the backward pass (activation checkpointing's
    recomputation), outside compiled code."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


class _ArmHook:
    """Pre-forward hook: decides whether this forward builds an operator (picklable).

    A deep copy of a hooked model (an EMA or SWA copy) gets an inert copy of the hook: the copy
    never builds operators, and the regularizer or metric behind the hook is not copied with it.
    """

    def __init__(self, name: str, entry: _Entry, active: Callable[[], bool],
                 reentrant_error: str | None = None) -> None:
        self.name, self.entry, self.active, self.reentrant_error = name, entry, active, reentrant_error
        self.armed = self.replaying = self.forward_armed = False
        self.graph_forwards = 0  # forwards with gradients not yet recomputed (checkpointing)

    def __deepcopy__(self, memo: dict) -> _ArmHook:
        return _ArmHook(self.name, self.entry, _never)

    @torch.compiler.disable  # decided in Python: no guard on a step counter, no recompile per step
    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.replaying = recomputing()
        if self.replaying:
            if self.graph_forwards == 0 and torch.is_grad_enabled() and self.reentrant_error:
                # recomputed without any forward that built a graph: the original forward ran
                # without gradients, i.e. under reentrant checkpointing
                raise RuntimeError(f"layer {self.name!r}: {self.reentrant_error}")
            self.graph_forwards = max(0, self.graph_forwards - 1)
            self.armed = self.forward_armed  # the checkpoint expects the original forward's ops
        else:
            self.armed = bool(self.active())
            if torch.is_grad_enabled():  # only such a forward can be recomputed in backward
                self.forward_armed = self.armed
                self.graph_forwards = min(self.graph_forwards + 1, 1 << 16)
        if self.armed and self.entry.prepare is not None:
            self.entry.prepare(module)


class _ExtractHook:
    """Forward hook: extracts the operator and hands it to the callback (picklable)."""

    def __init__(self, name: str, entry: _Entry, arm: _ArmHook, callback: OperatorCallback,
                 replay: OperatorCallback | None = None,
                 on_not_causal: Callable[[str, NotCausalError], None] | None = None) -> None:
        self.name, self.entry, self.arm, self.callback, self.replay = name, entry, arm, callback, replay
        self.on_not_causal = on_not_causal

    def __deepcopy__(self, memo: dict) -> _ExtractHook:
        arm = memo.get(id(self.arm)) or self.arm.__deepcopy__(memo)
        return _ExtractHook(self.name, self.entry, arm, _ignore)

    @torch.compiler.disable  # the consumer's bookkeeping stays out of compiled graphs
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        if not self.arm.armed:
            return None
        self.arm.armed = False
        if output is None and sys.exc_info()[1] is not None:
            return None  # the forward raised: nothing to extract (the mixer dropped its capture)
        try:
            operator = operator_of(self.entry.extract(module, args, kwargs, output))
        except NotCausalError as error:
            warn_user(f"ess-reg leaves out layer {self.name!r} ({type(module).__name__}) in this "
                          f"forward: {error}")
            if self.on_not_causal is not None:
                self.on_not_causal(self.name, error)
            return None
        if self.arm.replaying:
            return None if self.replay is None else self.replay(self.name, module, operator, output)
        return self.callback(self.name, module, operator, output)


_CHECKING = [False]


def checking() -> bool:
    """Whether :func:`ess_reg.check_capture` is running: extractors whose :class:`Capture` costs
    extra work (recomputed projections or gates) build it only then, so a training step's capture
    carries only the operator."""
    return _CHECKING[0]


def operator_of(result: Operator | Capture) -> Operator:
    """The operator of an extractor's result (a bare operator or a :class:`Capture`)."""
    return result.operator if isinstance(result, Capture) else result


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
    entry = lookup_by_class(_REGISTRY, module)
    if entry is not None or not _RULES:
        return entry
    return next((rule_entry for predicate, rule_entry in _RULES if predicate(module)), None)


def _mixer_operator(module: SequenceMixer, args, kwargs, output) -> Capture:
    # taken off the module by its last reader: nothing on a module may hold an autograd graph
    u, y = module.captured_io or (None, None)
    operator = module.take_operator()
    return operator if u is None else Capture(operator, u, y)


register_extractor(SequenceMixer, _mixer_operator, prepare=SequenceMixer.request_capture)
