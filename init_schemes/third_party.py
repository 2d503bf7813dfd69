"""Schemes for the third-party layers the capture registry recognises.

HF transformers' ``MambaMixer`` and mambapy's ``MambaBlock`` own ``A_log`` and ``dt_proj.bias`` like
the reference S6 mixer; HF's ``Mamba2Mixer`` owns ``A_log`` and ``dt_bias`` (one per head) like the
SSD mixer; s5-pytorch's ``S5`` owns the complex diagonal ``seq.Lambda`` and ``seq.log_step``, which the
S4D schemes describe. Registered on first use for the packages this process has imported.
"""

from __future__ import annotations

import importlib
import sys

import torch
from torch import nn

from ess_reg.mixers import SelectiveSSM, StateSpaceDuality
from init_schemes.registry import _DT_RANGES, CANDIDATES, DEFAULTS, SCHEMES, Apply, _range
from init_schemes.s4d import log_uniform_, s4d_modes

_DONE: set[str] = set()


@torch.no_grad()
def s5_lambda_(Lambda: torch.Tensor, scheme: str = "legs") -> torch.Tensor:
    """Set S5's complex diagonal ``Lambda`` (``[P]``) to the ``P`` modes of an S4D scheme
    (``s4d_modes(scheme, 2 P)``; S5 reads out ``Re(C x)``, so one mode of each conjugate pair is kept)."""
    if not Lambda.is_complex():
        raise ValueError(f"Lambda must be a complex tensor, got {Lambda.dtype}")
    modes = s4d_modes(scheme, 2 * Lambda.shape[-1])
    return Lambda.copy_(modes.to(Lambda.dtype).expand_as(Lambda))


def _s5(scheme: str, dt: tuple[float, float] = (1e-3, 1e-1)) -> Apply:
    def apply(m: nn.Module, g: torch.Generator) -> None:
        s5_lambda_(m.seq.Lambda, scheme)
        log_uniform_(m.seq.log_step, *dt, generator=g)
    return apply


def _like(cls: type, reference: type) -> None:
    """``cls`` owns the parameters ``reference`` owns: the same schemes, default and candidates."""
    for table in SCHEMES.values():
        if reference in table:
            table[cls] = table[reference]
    DEFAULTS[cls], CANDIDATES[cls] = DEFAULTS[reference], CANDIDATES[reference]


def _register_s5(cls: type) -> None:
    for scheme in ("lin", "inv", "real", "legs"):
        SCHEMES[f"s4d_{scheme}"][cls] = _s5(scheme)
    SCHEMES["default"][cls] = DEFAULTS[cls] = _s5("legs")  # S5's own HiPPO-N start
    CANDIDATES[cls] = [(f"s4d_{s} dt={_range(dt)}", _s5(s, dt))
                       for s in ("legs", "lin", "inv", "real") for dt in _DT_RANGES]


#: package -> (module, class, register) for each layer it defines.
_LAYERS = {
    "transformers": (("transformers.models.mamba.modeling_mamba", "MambaMixer",
                      lambda cls: _like(cls, SelectiveSSM)),
                     ("transformers.models.mamba2.modeling_mamba2", "Mamba2Mixer",
                      lambda cls: _like(cls, StateSpaceDuality))),
    "mambapy": (("mambapy.mamba", "MambaBlock", lambda cls: _like(cls, SelectiveSSM)),),
    "s5": (("s5", "S5", _register_s5),),
}


def register_available_schemes() -> None:
    """Add the schemes of the third-party layers whose packages are imported (cheap when done)."""
    for package, layers in _LAYERS.items():
        if package in _DONE or package not in sys.modules:
            continue
        _DONE.add(package)
        for module, name, register in layers:
            try:
                cls = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):  # another version of the package
                continue
            register(cls)
