"""s5-pytorch's ``S5`` (MIMO diagonal LTI): one SISO operator per (output, input) channel pair."""

from __future__ import annotations

import torch
from torch import nn

from ess_reg.capture import Capture, checking
from ess_reg.operators import DiagonalRealization


def s5_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization | Capture:
    """``T_{h, h'}[i, j] = Re(sum_p C[h, p] Lambda_bar_p^(i-j) B_bar[p, h'])`` (S5 takes ``Re``
    without a factor 2, all eigenvalues being kept), for every pair of output channel ``h`` and input
    channel ``h'``: channel ``k = h * H + h'`` of the returned ``[H * H, L, P]`` realization (the
    same for every example; the ``D`` skip is outside ``T``). The input of output channel ``h`` is
    the sum over ``h'`` of ``T_{h, h'} u_{h'}``."""
    seq = module.seq
    if seq.liquid or seq.bidir or seq.degree != 1:
        raise ValueError("S5 with liquid=True, bidir=True or degree != 1 has no fixed causal "
                         "operator; ESS supports the plain S5 layer")
    signal = args[0] if args else kwargs["signal"]
    step_scale = kwargs.get("step_scale", args[1] if len(args) > 1 else 1.0)
    varying = torch.is_tensor(step_scale) and bool((step_scale != step_scale.flatten()[0]).any())
    if varying:
        raise ValueError("S5 with a per-example step_scale has one operator per example; "
                         "call it with a scalar step_scale")
    scale = float(step_scale.flatten()[0]) if torch.is_tensor(step_scale) else float(step_scale)
    B_tilde, C_tilde = seq.get_BC_tilde()
    Lambda_bar, B_bar = seq.discretize(seq.Lambda, B_tilde, scale * torch.exp(seq.log_step))
    width, length = C_tilde.shape[0], signal.shape[-2]
    c = C_tilde[:, None, :].expand(width, width, -1).reshape(width * width, 1, -1)  # k = h * H + h'
    b = B_bar.T[None, :, :].expand(width, width, -1).reshape(width * width, 1, -1)
    log_decay = torch.log(Lambda_bar)[None, None, :]
    shape = (width * width, length, C_tilde.shape[1])
    # S5 keeps both modes of every conjugate pair, so its real state has P dimensions, not 2 P.
    operator = DiagonalRealization(c.expand(shape), b.expand(shape), log_decay.expand(shape),
                                   state_size=C_tilde.shape[1], validate=False)
    if not checking():
        return operator
    # channel k = h * H + h' acts on input channel h'
    u = signal.transpose(-1, -2)[..., None, :, :, None].expand(
        *signal.shape[:-2], width, width, length, 1).reshape(*signal.shape[:-2], width * width, length, 1)

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # [..., H * H, L, 1] -> the layer's output
        pairs = mixed[..., 0].reshape(*mixed.shape[:-3], width, width, length).sum(-2)
        return pairs.transpose(-1, -2) + seq.D * signal

    return Capture(operator, u, output, readout)
