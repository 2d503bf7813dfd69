"""Schemes for the third-party layers the capture registry recognises.

HF transformers' ``MambaMixer`` and mambapy's ``MambaBlock`` own ``A_log`` and ``dt_proj.bias`` like
the reference S6 mixer; HF's ``Mamba2Mixer`` owns ``A_log`` and ``dt_bias`` (one per head) like the
SSD mixer; s5-pytorch's ``S5`` owns the complex diagonal ``seq.Lambda`` and ``seq.log_step``, which the
S4D schemes describe. Registered on first use for the packages this process has imported.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from init_schemes.registry import _DT_RANGES, CANDIDATES, DEFAULTS, SCHEMES, Apply, _range, _s6, _ssd
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


def _register_selective(cls: type) -> None:
    SCHEMES["mamba"][cls] = DEFAULTS[cls] = _s6()
    CANDIDATES[cls] = [(f"mamba A=-{a:g}*(1..N) dt={_range(dt)}", _s6(dt, a))
                       for a in (1.0, 0.25) for dt in (*_DT_RANGES, (1e-1, 1.0))]


def _register_mamba2(cls: type) -> None:
    SCHEMES["mamba"][cls] = SCHEMES["mamba2"][cls] = DEFAULTS[cls] = _ssd()
    CANDIDATES[cls] = [(f"mamba2 A~U({_range(ar)}) dt={_range(dt)}", _ssd(ar, dt))
                       for ar in ((1.0, 16.0), (1.0, 4.0), (0.1, 1.0)) for dt in _DT_RANGES[:2]]


def _register_s5(cls: type) -> None:
    for scheme in ("lin", "inv", "real", "legs"):
        SCHEMES[f"s4d_{scheme}"][cls] = _s5(scheme)
    SCHEMES["default"][cls] = DEFAULTS[cls] = _s5("legs")  # S5's own HiPPO-N start
    CANDIDATES[cls] = [(f"s4d_{s} dt={_range(dt)}", _s5(s, dt))
                       for s in ("legs", "lin", "inv", "real") for dt in _DT_RANGES]


def register_available_schemes() -> None:
    """Add the schemes of the third-party layers whose packages are imported (cheap when done)."""
    if "transformers" not in _DONE and "transformers" in sys.modules:
        _DONE.add("transformers")
        try:
            from transformers.models.mamba.modeling_mamba import MambaMixer
            from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer
        except ImportError:
            pass
        else:
            _register_selective(MambaMixer)
            _register_mamba2(Mamba2Mixer)
    if "mambapy" not in _DONE and "mambapy" in sys.modules:
        _DONE.add("mambapy")
        try:
            from mambapy.mamba import MambaBlock
        except ImportError:
            pass
        else:
            _register_selective(MambaBlock)
    if "s5" not in _DONE and "s5" in sys.modules:
        _DONE.add("s5")
        try:
            from s5 import S5
        except ImportError:
            pass
        else:
            _register_s5(S5)
