"""``ess_init``: choose each mixer's initialization by the effective state-size it produces."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ess_reg._table import format_table
from ess_reg.capture import hook_operators, recognised_modules
from ess_reg.functional.summary import ess_summary
from ess_reg.operators import DenseOperator, DiagonalRealization, NotCausalError, Operator
from init_schemes.registry import CANDIDATES, DEFAULTS, SCHEMES, Apply, lookup
from init_schemes.third_party import register_available_schemes

_OBJECTIVES = ("utilization", "ess")


@dataclass
class LayerInit:
    """What ``ess_init`` did to one layer (``before`` / ``after``: the objective on the probe)."""

    layer: str
    mixer: str
    scheme: str
    before: float
    after: float
    evaluated: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class InitReport:
    """Per-layer outcome of :func:`ess_init`; ``str()`` gives a table."""

    layers: list[LayerInit]
    objective: str

    def __getitem__(self, layer: str) -> LayerInit:
        for entry in self.layers:
            if entry.layer == layer:
                return entry
        raise KeyError(layer)

    def __str__(self) -> str:
        header = ("layer", "mixer", "scheme", f"{self.objective} before", f"{self.objective} after")
        rows = [(e.layer, e.mixer, e.scheme, f"{e.before:.3f}", f"{e.after:.3f}") for e in self.layers]
        return format_table(header, rows)


def ess_init(
    model: nn.Module,
    *,
    probe: Any = None,
    scheme: str = "auto",
    objective: str = "utilization",
    candidates: Mapping[str, Sequence[tuple[str, Apply]]] | None = None,
    seed: int = 0,
    verbose: bool = True,
    splits: int = 8,
) -> InitReport:
    """Initialize every recognised mixer of ``model`` (in place) and report what was done.

    With a named ``scheme`` (see ``init_schemes.SCHEMES``: ``s4d_lin``, ``s4d_inv``, ``s4d_real``,
    ``s4d_legs``, ``mamba``, ``mamba2``, ``gla``, ``gla_s6``, ``retnet``, ``wla``, ``la``, ``default``)
    the scheme is applied to every mixer it covers. With ``"auto"``, layer by layer in forward order, each
    candidate scheme or hyper-parameter setting of the layer's type (``dt`` range, ``A`` spectrum, gate
    normalizer and bias, decay spans, feature map and temperature; ``init_schemes.CANDIDATES``, or
    ``candidates[mixer_name]``) is applied and scored by the entropy-ESS ``objective`` it gives on
    ``probe`` (``"utilization"``: ESS / TSS; ``"ess"``: average ESS), and the best one is kept (the
    current initialization stays when nothing beats it).

    Args:
        probe: input for ``model(probe)``: a tensor, a tuple/list (``model(*probe)``) or a dict
            (``model(**probe)``); None draws 8 random sequences of 64 tokens through the model's own
            embedding.
        seed: makes the random draws of the schemes (and of the probe) reproducible.
        splits: evenly spaced splits used to score (the Gramian route makes this cheap).

    Only the parameters a scheme owns change (``A``, ``dt``, gates, decays, feature maps,
    temperatures); every other parameter and the global RNG state are left alone; ``train()`` /
    ``eval()`` is restored.
    """
    if objective not in _OBJECTIVES:
        raise ValueError(f"objective must be one of {_OBJECTIVES}, got {objective!r}")
    if scheme != "auto" and scheme not in SCHEMES:
        raise ValueError(f"scheme must be 'auto' or one of {sorted(SCHEMES)}, got {scheme!r}")
    mixers = recognised_modules(model, required=True, causal_only=True)
    register_available_schemes()
    probe = _default_probe(model, seed) if probe is None else probe
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        layers = []
        for name, module in mixers.items():
            label = getattr(module, "name", "") or type(module).__name__
            try:
                before = _score(model, name, module, probe, objective, splits)
            except NotCausalError:  # the hooks warned, naming the layer
                layers.append(LayerInit(name, label, "unchanged (not causal on the probe)",
                                        math.nan, math.nan))
                continue
            if scheme != "auto":
                apply = lookup(SCHEMES[scheme], module)
                if apply is None:
                    layers.append(LayerInit(name, label, "unchanged (scheme does not apply)", before, before))
                    continue
                apply(module, generator)
                after = _score(model, name, module, probe, objective, splits)
                layers.append(LayerInit(name, label, scheme, before, after))
                continue
            options = _candidates_for(module, label, candidates)
            if not options:
                layers.append(LayerInit(name, label, "unchanged (no schemes)", before, before))
                continue
            original = copy.deepcopy(module.state_dict())  # holds the chosen settings too
            best = ("unchanged", before, original)
            evaluated = []
            for option, apply in options:
                module.load_state_dict(original)
                draw = int(torch.randint(2**31, (1,), generator=generator))
                apply(module, torch.Generator().manual_seed(draw))
                value = _score(model, name, module, probe, objective, splits)
                evaluated.append((option, value))
                if value > best[1]:
                    best = (option, value, copy.deepcopy(module.state_dict()))
            module.load_state_dict(best[2])
            layers.append(LayerInit(name, label, best[0], before, best[1], evaluated))
    finally:
        model.train(was_training)
    report = InitReport(layers, objective)
    if verbose:
        print(report)
    return report


def init_weights_ess(module: nn.Module, name: str = "") -> None:
    """Per-module reference initialization of recognised mixers (others untouched); for
    ``timm.models.named_apply(init_weights_ess, model)``. Uses each type's default scheme, with a
    seed drawn from torch's global generator: every module gets its own draws, and
    ``torch.manual_seed`` makes them reproducible."""
    register_available_schemes()
    apply = lookup(DEFAULTS, module)
    if apply is not None:
        seed = int(torch.randint(0, 2**62, ()).item())
        apply(module, torch.Generator().manual_seed(seed))


# -- helpers ------------------------------------------------------------------------------------
def _candidates_for(module, label, candidates):
    if candidates is not None and label in candidates:
        return list(candidates[label])
    options = lookup(CANDIDATES, module) or []
    return list(options(module) if callable(options) else options)


def _score(model, name, module, probe, objective, splits) -> float:
    kept, not_causal = {}, {}
    handles = hook_operators({name: module}, lambda n, m, op, out: kept.__setitem__(n, op),
                             on_not_causal=not_causal.__setitem__)
    try:
        with torch.no_grad():
            _run(model, probe)
    finally:
        for handle in handles:
            handle.remove()
    if name in not_causal and name not in kept:
        raise NotCausalError(str(not_causal[name]))
    if name not in kept:
        raise ValueError(f"the probe did not run layer {name!r}; pass a probe that reaches it")
    summary = ess_summary(_subsample(kept[name]), "entropy", splits=splits)
    return float(summary["utilization" if objective == "utilization" else "ess"])


#: Channels (batch x channel) scored per layer: an evenly spaced subset keeps scoring cheap for
#: wide layers (S6 has ``expand * d_model`` channels per example).
_MAX_SCORED = 64


def _subsample(op: Operator) -> Operator:
    flat = int(torch.tensor(op.shape).prod())
    if flat <= _MAX_SCORED:
        return op
    index = torch.linspace(0, flat - 1, _MAX_SCORED).round().long()
    if isinstance(op, DiagonalRealization):
        parts = [None if t is None else t.reshape(-1, *t.shape[-2:])[index][None]
                 for t in (op.c, op.b, op.log_decay)]
        return DiagonalRealization(*parts, state_size=op.state_size, validate=False)
    matrix = op.dense().reshape(-1, op.seq_len, op.seq_len)[index][None]
    return DenseOperator(matrix, validate=False)


def _run(model: nn.Module, probe: Any) -> None:
    if isinstance(probe, Mapping):
        model(**probe)
    elif isinstance(probe, tuple | list):
        model(*probe)
    else:
        model(probe)


def _default_probe(model: nn.Module, seed: int) -> torch.Tensor:
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ValueError("probe=None needs a model with an nn.Embedding to draw random tokens; "
                         "pass probe= (a batch the model accepts)")
    g = torch.Generator().manual_seed(seed)
    device = embedding.weight.device
    return torch.randint(0, embedding.num_embeddings, (8, 64), generator=g).to(device)
