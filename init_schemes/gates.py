"""Gate and decay initializations: GLA gates, RetNet decays, WLA memory spans."""

from __future__ import annotations

import math

import torch

from ess_reg.mixers import GatedLinearAttention, GatedSelectiveSSM, WeightedLinearAttention


@torch.no_grad()
def gla_gate_(
    mixer: GatedLinearAttention | GatedSelectiveSSM, normalizer: float = 16.0, bias: float = 0.0
) -> None:
    """GLA: ``log alpha = logsigmoid(W2 W1 x + b) / normalizer`` with the bias ``b`` set to ``bias``.

    Also sets the gate of the GLA-S6 hybrid (``gla_s6``), whose step is the same expression.

    At ``x = 0`` the per-step decay is ``sigmoid(bias)^(1 / normalizer)`` (``2^(-1/16) = 0.958`` with
    the defaults): a larger normalizer or bias forgets more slowly.
    """
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    mixer.gate_logit_normalizer = float(normalizer)
    mixer.gate[1].bias.fill_(bias)


@torch.no_grad()
def retnet_decay_(mixer: WeightedLinearAttention) -> None:
    """RetNet's fixed decays ``gamma_h = 1 - 2^(-5-h)`` for head ``h`` (all features of a head)."""
    heads = mixer.decay_logit.shape[0]
    gamma = 1 - 2.0 ** (-5 - torch.arange(heads, dtype=torch.float64))
    _set_wla_decay(mixer, gamma[:, None].expand_as(mixer.decay_logit))


@torch.no_grad()
def wla_memory_(
    mixer: WeightedLinearAttention, low: float = 4.0, high: float = 256.0,
    *, generator: torch.Generator | None = None,
) -> None:
    """WLA decays ``a = 1 - 1/m`` with memory spans ``m`` log-uniform in ``[low, high]`` tokens."""
    if not 1 <= low <= high:
        raise ValueError(f"need 1 <= low <= high, got {low}, {high}")
    u = torch.rand(mixer.decay_logit.shape, generator=generator, dtype=torch.float64)
    memory = torch.exp(u * (math.log(high) - math.log(low)) + math.log(low))
    _set_wla_decay(mixer, (1 - 1 / memory).clamp(1e-6, 1 - 1e-9))


def _set_wla_decay(mixer: WeightedLinearAttention, decay: torch.Tensor) -> None:
    # a = exp(-softplus(w))  =>  w = softplus^-1(-log a)
    rate = -torch.log(decay)
    mixer.decay_logit.copy_((rate + torch.log(-torch.expm1(-rate))).to(mixer.decay_logit.dtype))
