"""ESS-informed initializers for featurizers and state-space parameters.

Timm-style in-place ``*_`` functions for the reference schemes (S4D-Lin/Inv/Real/LegS, Mamba-1/2
``A`` and ``dt``, GLA gates, RetNet decays, WLA memory spans, linear-attention feature maps), named
schemes per mixer type, and ``ess_init(model)``, which picks each layer's scheme by the effective
state-size it produces.
"""

from init_schemes.ess_init import InitReport, LayerInit, ess_init, init_weights_ess
from init_schemes.gates import gla_gate_, retnet_decay_, wla_memory_
from init_schemes.linear_attention import PLAIN_FEATURE_MAPS, la_feature_map_
from init_schemes.mamba import dt_bias_, mamba2_A_log_, mamba_A_log_
from init_schemes.projections import projections_
from init_schemes.registry import CANDIDATES, DEFAULTS, SCHEMES
from init_schemes.s4d import hippo_legs, log_uniform_, s4d_A_, s4d_modes
from init_schemes.third_party import s5_lambda_

__all__ = [
    "CANDIDATES",
    "DEFAULTS",
    "PLAIN_FEATURE_MAPS",
    "SCHEMES",
    "InitReport",
    "LayerInit",
    "dt_bias_",
    "ess_init",
    "gla_gate_",
    "hippo_legs",
    "init_weights_ess",
    "la_feature_map_",
    "log_uniform_",
    "mamba2_A_log_",
    "mamba_A_log_",
    "projections_",
    "retnet_decay_",
    "s4d_A_",
    "s4d_modes",
    "s5_lambda_",
    "wla_memory_",
]
