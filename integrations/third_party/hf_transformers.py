"""Hugging Face transformers layers: Mamba mixers and eager attention modules.

Version guard: written against transformers 5.x; other major versions get a clear error.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.operators import DenseOperator, DiagonalRealization
from integrations.third_party._selective import depthwise_causal_conv, selective_operator

#: (module path, class name) of attention modules that return ``(output, weights)``.
ATTENTION_CLASSES = (
    ("transformers.models.llama.modeling_llama", "LlamaAttention"),
    ("transformers.models.mistral.modeling_mistral", "MistralAttention"),
    ("transformers.models.qwen2.modeling_qwen2", "Qwen2Attention"),
    ("transformers.models.gemma.modeling_gemma", "GemmaAttention"),
    ("transformers.models.phi3.modeling_phi3", "Phi3Attention"),
)


def check_version() -> None:
    import transformers

    major = int(transformers.__version__.split(".")[0])
    if major not in (4, 5):
        raise ImportError(f"ess-reg's transformers extractors support transformers 4.x and 5.x, "
                          f"found {transformers.__version__}")


def _hidden_states(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def mamba_mixer_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization:
    """Mamba-1 ``MambaMixer``: per inner channel ``d``,
    ``T_d[i, j] = sum_n C_{i,n} exp(A_{d,n} sum dt) dt_{j,d} B_{j,n}`` (the ``D`` skip and the
    ``silu(z)`` gate are outside ``T``). Rebuilt from the mixer's input and weights (``conv1d`` and
    ``dt_proj`` are applied through their weights in transformers 5, so no hook of theirs fires)."""
    hidden = _hidden_states(args, kwargs)
    mask = kwargs.get("attention_mask")
    u = mamba_inner_input(module, hidden, mask)[..., 0].transpose(1, 2)  # [B, L, D]
    return selective_operator(u, module.x_proj, module.dt_proj.weight, module.dt_proj.bias,
                              module.A_log, module.time_step_rank, module.ssm_state_size)


def mamba_inner_input(module: nn.Module, hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """``u`` (after conv and activation) for a ``MambaMixer`` input: ``[B, D, L, 1]``."""
    if mask is not None:
        hidden = hidden * mask[:, :, None].to(hidden.dtype)
    x, _ = module.in_proj(hidden).transpose(1, 2).chunk(2, dim=1)
    u = module.act(depthwise_causal_conv(x, module.conv1d))
    if mask is not None:
        u = u * mask[:, None, :].to(u.dtype)
    return u[..., None]


def mamba2_mixer_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization:
    """Mamba-2 ``Mamba2Mixer``: per head ``h``,
    ``T_h[i, j] = (C_i . B_j) exp(a_h sum dt) dt_{j,h}`` with ``B``, ``C`` of the head's group
    (scalar decay ``[B, H, L, 1]``; the ``D`` skip and the gated norm are outside ``T``)."""
    hidden = _hidden_states(args, kwargs)
    _, B, C, dt = mamba2_features(module, hidden)
    a = -torch.exp(module.A_log.float()).to(dt.dtype)
    return DiagonalRealization(C, dt * B, dt * a[None, :, None, None])


def mamba2_features(module: nn.Module, hidden: torch.Tensor):
    """``u [B, H, L, P]``, ``B``, ``C`` ``[B, H, L, N]`` and ``dt [B, H, L, 1]`` of a Mamba-2 input."""
    batch, length, _ = hidden.shape
    _, xbc, dt = module.in_proj(hidden).split(
        [module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)
    xbc = module.act(depthwise_causal_conv(xbc.transpose(1, 2), module.conv1d)).transpose(1, 2)
    x, B, C = torch.split(xbc, [module.intermediate_size, module.n_groups * module.ssm_state_size,
                                module.n_groups * module.ssm_state_size], dim=-1)
    repeat = module.num_heads // module.n_groups
    B = B.view(batch, length, module.n_groups, -1).repeat_interleave(repeat, dim=2).transpose(1, 2)
    C = C.view(batch, length, module.n_groups, -1).repeat_interleave(repeat, dim=2).transpose(1, 2)
    low, high = module.time_step_limit
    dt = F.softplus(dt + module.dt_bias).clamp(low, high).transpose(1, 2)[..., None]
    u = x.view(batch, length, module.num_heads, module.head_dim).transpose(1, 2)
    return u, B, C, dt


def attention_weights_operator(module: nn.Module, args, kwargs, output) -> DenseOperator:
    """Eager attention modules return ``(attn_output, attn_weights)``; the weights are ``T`` per
    (query) head, ``[B, H, L, L]``."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise ValueError(
            f"{type(module).__name__} returned no attention weights; build the model with "
            "attn_implementation='eager' so the attention matrices exist"
        )
    return DenseOperator(weights)


def register(register_extractor) -> list[str]:
    """Register every extractor whose class exists in the installed transformers."""
    check_version()
    done = []
    try:
        from transformers.models.mamba.modeling_mamba import MambaMixer

        register_extractor(MambaMixer, mamba_mixer_operator)
        done.append("MambaMixer")
    except ImportError:  # pragma: no cover - depends on the installed version
        pass
    try:
        from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer

        register_extractor(Mamba2Mixer, mamba2_mixer_operator)
        done.append("Mamba2Mixer")
    except ImportError:  # pragma: no cover - depends on the installed version
        pass
    for path, name in ATTENTION_CLASSES:
        try:
            cls = getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):
            continue
        register_extractor(cls, attention_weights_operator)
        done.append(name)
    return done
