"""Reference sequence mixers, each ``[B, L, D] -> [B, L, D]`` with an exact ``trace``.

``MIXERS[name](d_model=D)`` builds one with defaults for everything else.
"""

from __future__ import annotations

from ess_reg.mixers.attention import SoftmaxAttention
from ess_reg.mixers.base import MixerTrace, RealizationMixer, SequenceMixer
from ess_reg.mixers.feature_maps import FEATURE_MAPS, FeatureMap, make_feature_map
from ess_reg.mixers.gla import GatedLinearAttention
from ess_reg.mixers.gla_s6 import GatedSelectiveSSM
from ess_reg.mixers.hyena import Hyena
from ess_reg.mixers.linear_attention import LinearAttention
from ess_reg.mixers.s4d import S4D
from ess_reg.mixers.s6 import SelectiveSSM
from ess_reg.mixers.ssd import StateSpaceDuality
from ess_reg.mixers.wla import WeightedLinearAttention

MIXERS: dict[str, type[SequenceMixer]] = {
    cls.name: cls
    for cls in (SoftmaxAttention, LinearAttention, WeightedLinearAttention, GatedLinearAttention,
                SelectiveSSM, GatedSelectiveSSM, StateSpaceDuality, S4D, Hyena)
}

__all__ = [
    "FEATURE_MAPS",
    "MIXERS",
    "S4D",
    "FeatureMap",
    "GatedLinearAttention",
    "GatedSelectiveSSM",
    "Hyena",
    "LinearAttention",
    "MixerTrace",
    "RealizationMixer",
    "SelectiveSSM",
    "SequenceMixer",
    "SoftmaxAttention",
    "StateSpaceDuality",
    "WeightedLinearAttention",
    "make_feature_map",
]
