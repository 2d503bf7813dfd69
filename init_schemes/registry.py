"""Named initialization schemes per mixer type, and the candidate grids ``ess_init`` searches."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ess_reg._class_lookup import lookup_by_class
from ess_reg.mixers import (
    S4D,
    GatedLinearAttention,
    GatedSelectiveSSM,
    LinearAttention,
    SelectiveSSM,
    StateSpaceDuality,
    WeightedLinearAttention,
)
from init_schemes.gates import gla_gate_, retnet_decay_, wla_memory_
from init_schemes.linear_attention import PLAIN_FEATURE_MAPS, la_feature_map_, plain_feature_map
from init_schemes.mamba import dt_bias_, mamba2_A_log_, mamba_A_log_
from init_schemes.s4d import log_uniform_, s4d_A_

#: ``apply(mixer, generator)``: sets the parameters the scheme owns, in place.
Apply = Callable[[nn.Module, torch.Generator], None]

_DT_RANGES = ((1e-3, 1e-1), (1e-2, 1.0), (1e-4, 1e-2))


def _s4d(scheme: str, dt: tuple[float, float] = (1e-3, 1e-1)) -> Apply:
    def apply(m: S4D, g: torch.Generator) -> None:
        s4d_A_(m.log_A_real, m.A_imag, scheme)
        log_uniform_(m.log_dt, *dt, generator=g)
    return apply


def _s6(dt: tuple[float, float] = (1e-3, 1e-1), a_scale: float = 1.0) -> Apply:
    def apply(m: SelectiveSSM, g: torch.Generator) -> None:
        mamba_A_log_(m.A_log, a_scale)
        dt_bias_(m.dt_proj.bias, *dt, generator=g)
    return apply


def _ssd(a_range: tuple[float, float] = (1.0, 16.0), dt: tuple[float, float] = (1e-3, 1e-1)) -> Apply:
    def apply(m: StateSpaceDuality, g: torch.Generator) -> None:
        mamba2_A_log_(m.A_log, *a_range, generator=g)
        dt_bias_(m.dt_bias, *dt, generator=g)
    return apply


def _gla(normalizer: float = 16.0, bias: float = 0.0) -> Apply:
    return lambda m, g: gla_gate_(m, normalizer, bias)


def _gla_s6(normalizer: float = 16.0, bias: float = 0.0, a_scale: float = 1.0) -> Apply:
    def apply(m: GatedSelectiveSSM, g: torch.Generator) -> None:
        gla_gate_(m, normalizer, bias)
        mamba_A_log_(m.A_log, a_scale)
    return apply


def _wla(low: float = 4.0, high: float = 256.0) -> Apply:
    return lambda m, g: wla_memory_(m, low, high, generator=g)


def _la(temperature: float = 1.0, feature_map: str | None = None) -> Apply:
    return lambda m, g: la_feature_map_(m, feature_map, temperature)


def _la_candidates(mixer: LinearAttention) -> list[tuple[str, Apply]]:
    """Temperatures, and, for a layer with a plain feature map, the other plain maps of its width
    (positive ones only under ``normalize=True``)."""
    current = plain_feature_map(mixer)
    maps: list[str | None] = [None]
    if current is not None:
        maps = [name for name in PLAIN_FEATURE_MAPS
                if not (mixer.normalize and name == "identity")]
    options = []
    for name in maps:
        label = f"la {name or 'feature map unchanged'}"
        swap = None if name == current else name
        options += [(f"{label} temperature={t:g}", _la(t, swap)) for t in (0.5, 1.0, 2.0, 4.0)]
    return options


#: Named schemes: ``name -> {mixer class: apply}``.
SCHEMES: dict[str, dict[type, Apply]] = {
    "s4d_lin": {S4D: _s4d("lin")},
    "s4d_inv": {S4D: _s4d("inv")},
    "s4d_real": {S4D: _s4d("real")},
    "s4d_legs": {S4D: _s4d("legs")},
    "mamba": {SelectiveSSM: _s6(), StateSpaceDuality: _ssd()},
    "mamba2": {StateSpaceDuality: _ssd()},
    "gla": {GatedLinearAttention: _gla()},
    "gla_s6": {GatedSelectiveSSM: _gla_s6()},
    "retnet": {WeightedLinearAttention: lambda m, g: retnet_decay_(m)},
    "wla": {WeightedLinearAttention: _wla()},
    "la": {LinearAttention: _la()},
}
#: The reference (default) scheme of each mixer type, used by ``init_weights_ess`` and ``"default"``.
DEFAULTS: dict[type, Apply] = {
    S4D: _s4d("lin"), SelectiveSSM: _s6(), StateSpaceDuality: _ssd(),
    GatedLinearAttention: _gla(), GatedSelectiveSSM: _gla_s6(), WeightedLinearAttention: _wla(),
    LinearAttention: _la(),
}
SCHEMES["default"] = dict(DEFAULTS)


def _range(r: tuple[float, float]) -> str:
    return f"{r[0]:g}..{r[1]:g}"


#: What ``scheme="auto"`` tries, per mixer type: ``[(label, apply), ...]``, or a function of the
#: layer returning that list.
CANDIDATES: dict[type, list[tuple[str, Apply]] | Callable[[nn.Module], list[tuple[str, Apply]]]] = {
    S4D: [(f"s4d_{s} dt={_range(dt)}", _s4d(s, dt))
          for s in ("lin", "inv", "real", "legs") for dt in _DT_RANGES],
    SelectiveSSM: [(f"mamba A=-{a:g}*(1..N) dt={_range(dt)}", _s6(dt, a))
                   for a in (1.0, 0.25) for dt in (*_DT_RANGES, (1e-1, 1.0))],
    StateSpaceDuality: [(f"mamba2 A~U({_range(ar)}) dt={_range(dt)}", _ssd(ar, dt))
                        for ar in ((1.0, 16.0), (1.0, 4.0), (0.1, 1.0)) for dt in _DT_RANGES[:2]],
    GatedLinearAttention: [(f"gla normalizer={n:g} bias={b:g}", _gla(n, b))
                           for n in (1, 4, 16, 64) for b in (0.0, 3.0)],
    GatedSelectiveSSM: [(f"gla_s6 normalizer={n:g} bias={b:g} A=-{a:g}*(1..N)", _gla_s6(n, b, a))
                        for n in (1, 4, 16, 64) for b in (0.0, 3.0) for a in (1.0, 0.25)],
    WeightedLinearAttention: [("retnet", lambda m, g: retnet_decay_(m))]
    + [(f"wla memory={_range(r)}", _wla(*r)) for r in ((4.0, 256.0), (16.0, 1024.0), (1.0, 32.0))],
    LinearAttention: _la_candidates,
}


def lookup(table: dict[type, object], module: nn.Module):
    """The entry for ``module``'s class or its nearest base, else None."""
    return lookup_by_class(table, module)
