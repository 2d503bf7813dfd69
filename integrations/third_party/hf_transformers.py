"""Hugging Face transformers layers: Mamba mixers and eager attention modules.

Version guard: written against transformers 5.x; other major versions get a clear error.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F
from torch import nn

from ess_reg.capture import Capture, checking
from ess_reg.operators import DenseOperator, DiagonalRealization, NotCausalError
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


def _masked(states: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``states [B, L, d]`` with padded positions (``mask [B, L]`` zero) set to zero."""
    return states if mask is None else states * mask[:, :, None].to(states.dtype)


def mamba_mixer_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization | Capture:
    """Mamba-1 ``MambaMixer``: per inner channel ``d``,
    ``T_d[i, j] = sum_n C_{i,n} exp(A_{d,n} sum dt) dt_{j,d} B_{j,n}`` (the ``D`` skip and the
    ``silu(z)`` gate are outside ``T``). Rebuilt from the mixer's input and weights (``conv1d`` and
    ``dt_proj`` are applied through their weights in transformers 5, so no hook of theirs fires)."""
    hidden = _hidden_states(args, kwargs)
    mask = kwargs.get("attention_mask")
    inner = mamba_inner_input(module, hidden, mask)  # [B, D, L, 1]
    operator = selective_operator(inner[..., 0].transpose(1, 2), module.x_proj, module.dt_proj.weight,
                                  module.dt_proj.bias, module.A_log, module.time_step_rank,
                                  module.ssm_state_size)
    if not checking():
        return operator
    gate = module.in_proj(_masked(hidden, mask)).transpose(1, 2).chunk(2, dim=1)[1]  # [B, D, L]

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # T u [B, D, L, 1] -> the mixer's output
        scan = (mixed + module.D[None, :, None, None] * inner)[..., 0] * F.silu(gate)
        return module.out_proj(scan.transpose(1, 2))

    return Capture(operator, inner, output, readout)


def mamba_inner_input(module: nn.Module, hidden: torch.Tensor, mask=None) -> torch.Tensor:
    """``u`` (after conv and activation) for a ``MambaMixer`` input: ``[B, D, L, 1]``."""
    x, _ = module.in_proj(_masked(hidden, mask)).transpose(1, 2).chunk(2, dim=1)
    u = module.act(depthwise_causal_conv(x, module.conv1d))
    if mask is not None:
        u = u * mask[:, None, :].to(u.dtype)
    return u[..., None]


def mamba2_mixer_operator(module: nn.Module, args, kwargs, output) -> DiagonalRealization | Capture:
    """Mamba-2 ``Mamba2Mixer``: per head ``h``,
    ``T_h[i, j] = (C_i . B_j) exp(a_h sum dt) dt_{j,h}`` with ``B``, ``C`` of the head's group
    (scalar decay ``[B, H, L, 1]``; the ``D`` skip and the gated norm are outside ``T``)."""
    hidden = _hidden_states(args, kwargs)
    mask = kwargs.get("attention_mask")
    u, B, C, dt = mamba2_features(module, hidden, mask)
    a = -torch.exp(module.A_log.float()).to(dt.dtype)
    operator = DiagonalRealization(C, dt * B, dt * a[None, :, None, None])
    if not checking():
        return operator
    gate = module.in_proj(_masked(hidden, mask))[..., :module.intermediate_size]
    batch, length, _ = hidden.shape

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # T u [B, H, L, P] -> the mixer's output
        y = (mixed + module.D[None, :, None, None] * u).transpose(1, 2).reshape(batch, length, -1)
        return module.out_proj(module.norm(y, gate))

    return Capture(operator, u, output, readout)


def mamba2_features(module: nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None = None):
    """``u [B, H, L, P]``, ``B``, ``C`` ``[B, H, L, N]`` and ``dt [B, H, L, 1]`` of a Mamba-2 input
    ``hidden [B, L, d]``; a padding ``mask [B, L]`` zeroes the padded positions' input and their
    ``x``, ``B``, ``C`` after the convolution, as the mixer does (their ``dt`` still decays the state)."""
    batch, length, _ = hidden.shape
    _, xbc, dt = module.in_proj(_masked(hidden, mask)).split(
        [module.intermediate_size, module.conv_dim, module.num_heads], dim=-1)
    xbc = module.act(depthwise_causal_conv(xbc.transpose(1, 2), module.conv1d)).transpose(1, 2)
    xbc = _masked(xbc, mask)
    x, B, C = torch.split(xbc, [module.intermediate_size, module.n_groups * module.ssm_state_size,
                                module.n_groups * module.ssm_state_size], dim=-1)
    repeat = module.num_heads // module.n_groups
    B = B.view(batch, length, module.n_groups, -1).repeat_interleave(repeat, dim=2).transpose(1, 2)
    C = C.view(batch, length, module.n_groups, -1).repeat_interleave(repeat, dim=2).transpose(1, 2)
    low, high = module.time_step_limit
    dt = F.softplus(dt + module.dt_bias).clamp(low, high).transpose(1, 2)[..., None]
    u = x.view(batch, length, module.num_heads, module.head_dim).transpose(1, 2)
    return u, B, C, dt


def attention_weights_operator(module: nn.Module, args, kwargs, output) -> DenseOperator | Capture:
    """Eager attention modules return ``(attn_output, attn_weights)``; the weights are ``T`` per
    (query) head, ``[B, H, L, L]``. With the module's value and output projections found by name
    (``v_proj`` / GPT-2's ``c_attn`` / ``qkv_proj``; ``o_proj`` / ``c_proj`` / ``out_proj`` /
    ``dense``) the result is a :class:`~ess_reg.Capture` that :func:`ess_reg.check_capture` verifies."""
    weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
    if weights is None:
        raise ValueError(
            f"{type(module).__name__} returned no attention weights; build the model with "
            "attn_implementation='eager' so the attention matrices exist"
        )
    if weights.shape[-1] != weights.shape[-2]:
        raise NotCausalError(f"{type(module).__name__} attends to another sequence (cross-attention, "
                             f"weights {tuple(weights.shape)}): not a causal operator over one sequence")
    padded = _padded_queries(kwargs.get("attention_mask"), weights.shape[-1])
    if padded is not None:  # a padded query attends to nothing (left padding: to everything)
        weights = torch.where(padded[..., None], weights.new_zeros(()), weights)
    operator = DenseOperator(weights)
    if not checking():
        return operator
    hidden = args[0] if args else kwargs.get("hidden_states")
    projection = _child(module, OUTPUT_PROJECTIONS)
    values = None if hidden is None else _attention_values(module, hidden, weights.shape[1])
    if values is None or projection is None or not isinstance(output[0], torch.Tensor):
        return operator
    batch, length = hidden.shape[:2]

    def readout(mixed: torch.Tensor) -> torch.Tensor:  # [B, H, L, hd] -> the module's output
        return projection(mixed.transpose(1, 2).reshape(batch, length, -1))

    y = output[0]
    if padded is not None:  # padded positions' outputs are padding: compared as what T gives them
        y = torch.where(padded.all(1)[..., None], readout(torch.zeros_like(values)), y)
    return Capture(operator, values, y, readout)


def _padded_queries(mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """Padded query positions ``[B, 1|H, L]`` of an HF attention mask (boolean, True = attend, or
    additive, ``[B, 1|H, L, L]``): a causal query that may not attend to itself is padding. None when
    there is no such mask (whether any position is padded is not asked: that would wait for the
    device)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4 or mask.shape[-2:] != (length, length):
        return None
    diagonal = mask.diagonal(dim1=-2, dim2=-1)  # [B, 1|H, L]
    if diagonal.dtype == torch.bool:
        return ~diagonal
    if diagonal.is_floating_point():
        return diagonal < torch.finfo(diagonal.dtype).min / 2  # additive: min value or -inf
    return None


#: child names of an attention module's output projection and of its value projection
OUTPUT_PROJECTIONS = ("o_proj", "c_proj", "out_proj", "dense")
VALUE_PROJECTIONS = ("v_proj", "c_attn", "qkv_proj")


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Module | None:
    return next((getattr(module, n) for n in names if isinstance(getattr(module, n, None), nn.Module)), None)


def _attention_values(module: nn.Module, hidden: torch.Tensor, heads: int) -> torch.Tensor | None:
    """The values ``[B, H, L, hd]`` each query head mixes (key-value heads repeated), or None."""
    batch, length, _ = hidden.shape
    if isinstance(getattr(module, "v_proj", None), nn.Module):
        values = module.v_proj(hidden)
    elif (isinstance(getattr(module, "c_attn", None), nn.Module) and hasattr(module, "split_size")
          and not hasattr(module, "multi_query")):  # GPT-2's [q | k | v]; GPTBigCode differs
        parts = module.c_attn(hidden).split(module.split_size, dim=2)  # GPT-2: q, k, v
        if len(parts) != 3:
            return None
        values = parts[2]
    elif (isinstance(getattr(module, "qkv_proj", None), nn.Module) and hasattr(module, "head_dim")
          and type(module).__name__.startswith("Phi3")):  # Phi-3's [q | k | v]; CodeGen differs
        config = getattr(module, "config", None)
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        values = module.qkv_proj(hidden)[..., -kv_heads * module.head_dim:]  # q, k, v stacked
    else:
        return None
    values = values.view(batch, length, -1, values.shape[-1] // _kv_heads(values, module, heads))
    values = values.transpose(1, 2)
    if heads % values.shape[1]:
        return None
    return values.repeat_interleave(heads // values.shape[1], dim=1)


def _kv_heads(values: torch.Tensor, module: nn.Module, heads: int) -> int:
    head_dim = getattr(module, "head_dim", None)
    return values.shape[-1] // head_dim if head_dim else heads


def is_eager_hf_attention(module: nn.Module) -> bool:
    """transformers attention modules that return their weights (class name ``*Attention``)."""
    cls = type(module)
    return (cls.__module__.startswith("transformers.models.") and cls.__name__.endswith("Attention")
            and isinstance(getattr(module, "is_causal", None), bool)
            and _child(module, OUTPUT_PROJECTIONS) is not None
            and _child(module, VALUE_PROJECTIONS) is not None)


#: configs of text towers whose attention modules say ``is_causal=False`` (the class is shared
#: with the vision tower) but are always called with a causal mask (CLIP and its derivatives)
CAUSAL_MASK_TEXT_CONFIGS = ("CLIPTextConfig", "MetaClip2TextConfig", "XCLIPTextConfig",
                            "OwlViTTextConfig", "Owlv2TextConfig", "CLIPSegTextConfig")


def hf_attention_bidirectional(module: nn.Module) -> str | None:
    """Why a transformers attention module is non-causal before any call (None when causal).
    Text towers of the CLIP family pass a causal mask at call time: recognised by their config (a
    call that turns out non-causal is still left out then, with a warning naming the layer)."""
    if getattr(module, "is_cross_attention", False):
        return f"{type(module).__name__} is a cross-attention layer: it attends to another sequence"
    if getattr(module, "is_causal", True):
        return None
    if type(getattr(module, "config", None)).__name__ in CAUSAL_MASK_TEXT_CONFIGS:
        return None
    return (f"{type(module).__name__} has is_causal=False: an encoder or cross-attention layer "
            "attends both ways")


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
    from ess_reg.capture import register_extractor_rule

    register_extractor_rule(is_eager_hf_attention, attention_weights_operator,
                            bidirectional=hf_attention_bidirectional)
    done.append("transformers *Attention (eager)")
    return done
