"""Hugging Face transformers layers: Mamba mixers and eager attention modules.

Version guard: written against transformers 5.x; other major versions get a clear error.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.operators import DenseOperator, DiagonalRealization

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
    if mask is not None:
        hidden = hidden * mask[:, :, None].to(hidden.dtype)
    projected = module.in_proj(hidden).transpose(1, 2)
    x, _ = projected.chunk(2, dim=1)
    length = x.shape[-1]
    x = F.conv1d(x, module.conv1d.weight, module.conv1d.bias, padding=module.conv1d.padding[0],
                 groups=module.intermediate_size)[..., :length]
    u = module.act(x).transpose(1, 2)  # [B, L, D]
    if mask is not None:
        u = u * mask[:, :, None].to(u.dtype)
    step, B, C = torch.split(module.x_proj(u),
                             [module.time_step_rank, module.ssm_state_size, module.ssm_state_size], dim=-1)
    dt = F.softplus(step @ module.dt_proj.weight.T + module.dt_proj.bias)  # [B, L, D]
    A = -torch.exp(module.A_log.float()).to(dt.dtype)  # [D, N]
    dt = dt.transpose(1, 2)[..., None]  # [B, D, L, 1]
    shape = (hidden.shape[0], module.intermediate_size, length, module.ssm_state_size)
    return DiagonalRealization(C[:, None].expand(shape), dt * B[:, None], dt * A[None, :, None, :])


def mamba_inner_input(module: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``u`` (after conv and activation) for a ``MambaMixer`` input: ``[B, D, L, 1]``."""
    projected = module.in_proj(hidden).transpose(1, 2)
    x, _ = projected.chunk(2, dim=1)
    length = x.shape[-1]
    x = F.conv1d(x, module.conv1d.weight, module.conv1d.bias, padding=module.conv1d.padding[0],
                 groups=module.intermediate_size)[..., :length]
    return module.act(x)[..., None]


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
    for path, name in ATTENTION_CLASSES:
        try:
            cls = getattr(importlib.import_module(path), name)
        except (ImportError, AttributeError):
            continue
        register_extractor(cls, attention_weights_operator)
        done.append(name)
    return done
