"""``SequenceModel``: a small language model around the reference mixers (and an autoencoder)."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ess_reg.mixers import MIXERS, SequenceMixer
from ess_reg.mixers._kernels import HeadRMSNorm as RMSNorm


class Block(nn.Module):
    """Pre-norm residual block: ``x + mixer(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, mixer: SequenceMixer, d_model: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1, self.mixer = RMSNorm(d_model), mixer
        self.norm2 = RMSNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def build_mixer(name: str, d_model: int, **kwargs: Any) -> SequenceMixer:
    """``MIXERS[name](d_model, **kwargs)`` with the kwargs that mixer accepts."""
    if name not in MIXERS:
        raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
    cls = MIXERS[name]
    accepted = inspect.signature(cls.__init__).parameters
    return cls(d_model=d_model, **{k: v for k, v in kwargs.items() if k in accepted})


def _check_mixer_kwargs(names: list[str], kwargs: dict[str, Any]) -> None:
    accepted = set()
    for name in names:
        accepted |= set(inspect.signature(MIXERS[name].__init__).parameters)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"mixer keyword(s) {unknown} are not accepted by any of the mixers {names}")


class SequenceModel(nn.Module):
    """Embedding, ``n_layers`` pre-norm residual blocks (mixer + MLP), final norm and LM head.

    Args:
        mixer: a name from :data:`ess_reg.mixers.MIXERS`, or a list of names, one per layer, cycled
            over the layers for hybrids (e.g. ``["gla", "sa"]``).
        d_model: width. n_layers: number of blocks. vocab_size: number of tokens.
        mlp_ratio: MLP hidden width as a multiple of ``d_model``.
        **mixer_kwargs: passed to each mixer that accepts them (e.g. ``num_heads``, ``d_state``).

    ``forward(input_ids: [B, L]) -> logits [B, L, vocab_size]``.
    """

    def __init__(
        self,
        mixer: str | list[str] = "gla",
        d_model: int = 64,
        n_layers: int = 2,
        vocab_size: int = 256,
        mlp_ratio: int = 4,
        **mixer_kwargs: Any,
    ) -> None:
        super().__init__()
        names = [mixer] if isinstance(mixer, str) else list(mixer)
        if not names:
            raise ValueError("mixer must name at least one mixer")
        for name in names:
            if name not in MIXERS:
                raise ValueError(f"unknown mixer {name!r}; choose one of {sorted(MIXERS)}")
        _check_mixer_kwargs(names, mixer_kwargs)
        self.config = {"mixer": mixer, "d_model": d_model, "n_layers": n_layers,
                       "vocab_size": vocab_size, "mlp_ratio": mlp_ratio, **mixer_kwargs}
        self.mixer_names = [names[i % len(names)] for i in range(n_layers)]
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.blocks = nn.ModuleList(
            Block(build_mixer(name, d_model, **mixer_kwargs), d_model, mlp_ratio)
            for name in self.mixer_names
        )
        self.norm = RMSNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def mixers(self) -> list[SequenceMixer]:
        return [block.mixer for block in self.blocks]

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L] -> [B, L, D]`` (before the final norm)."""
        _require_token_ids(input_ids)
        if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
            raise TypeError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        x = self.embedding(input_ids)
        for block in self.blocks:
            x = block(x)
        return x

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.hidden_states(input_ids)))

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SequenceModel:
        return cls(**config)


class AutoEncoderModel(nn.Module):
    """MAD's compression backbone: a causal encoder, the last position as the code, an MLP decoder.

    The decoder maps ``code + sinusoidal(p)`` through ``norm, Linear, GELU, norm, Linear, GELU``,
    then ``norm, Linear(d, V)`` to the logits of every position ``p < max_len``.
    """

    def __init__(self, mixer: str | list[str] = "gla", d_model: int = 64, n_layers: int = 2,
                 vocab_size: int = 16, max_len: int = 32, **mixer_kwargs: Any) -> None:
        super().__init__()
        self.encoder = SequenceModel(mixer, d_model, n_layers, vocab_size, **mixer_kwargs)
        self.config = {**self.encoder.config, "max_len": max_len, "autoencoder": True}
        position = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(1e4) / d_model))
        table = torch.zeros(max_len, d_model)
        table[:, 0::2] = torch.sin(position * freq)
        table[:, 1::2] = torch.cos(position * freq)[:, : d_model // 2]
        self.register_buffer("positions", table)
        self.decoder = nn.Sequential(RMSNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                     RMSNorm(d_model), nn.Linear(d_model, d_model), nn.GELU(),
                                     RMSNorm(d_model), nn.Linear(d_model, vocab_size))

    @property
    def mixers(self) -> list[SequenceMixer]:
        return self.encoder.mixers

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        code = self.encoder.norm(self.encoder.hidden_states(input_ids))[:, -1:]  # [B, 1, D]
        return self.decoder(code + self.positions[None])

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AutoEncoderModel:
        config = {k: v for k, v in config.items() if k not in ("autoencoder", "mlp_ratio")}
        return cls(**config)


def _require_token_ids(input_ids: object) -> None:
    """A one-line TypeError for the inputs a newcomer passes instead of a ``[B, L]`` id tensor."""
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [batch, length] tensor of token ids, got shape "
                             f"{tuple(input_ids.shape)}" + ("; add a batch dimension: x[None]"
                                                            if input_ids.dim() == 1 else ""))
        return
    kind = type(input_ids).__name__
    if isinstance(input_ids, dict):
        hint = "a dict (a tokenizer's batch?): pass its 'input_ids' entry"
    elif hasattr(input_ids, "__array__"):
        hint = f"a {kind}: convert it with torch.as_tensor(x, dtype=torch.long)"
    elif isinstance(input_ids, list | tuple):
        hint = f"a {kind}: convert it with torch.tensor(x, dtype=torch.long)"
    else:
        hint = f"a {kind}"
    raise TypeError(f"input_ids must be a torch tensor of token ids [batch, length], got {hint}")
