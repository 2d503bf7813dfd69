"""Compression (MAD suite layout): rebuild a whole sequence from its last position's state."""

from __future__ import annotations

import numpy as np
import torch

from ess_reg.tasks.base import SyntheticTask, require


class Compression(SyntheticTask):
    """``L - 1`` random data tokens then the compression token ``V - 1``; targets equal inputs.

    Every position is scored. The task is meant for an autoencoder (``backbone = "autoencoder"``,
    :class:`ess_reg.models.AutoEncoderModel`): the encoder's state at the last token is the only
    code the decoder sees; with a plain language model it would be the identity map.
    """

    backbone = "autoencoder"

    def __init__(self, num_examples: int = 1000, seq_len: int = 32, vocab_size: int = 16,
                 seed: int = 0) -> None:
        require(num_examples >= 1, f"num_examples must be >= 1, got {num_examples}")
        require(seq_len >= 2, f"seq_len must be >= 2, got {seq_len}")
        require(vocab_size >= 2,
                f"vocab_size must be >= 2 (data plus the compression token), got {vocab_size}")
        self.vocab_size = vocab_size
        rng = np.random.default_rng(seed)
        data = rng.integers(0, vocab_size - 1, size=(num_examples, seq_len - 1))
        inputs = np.concatenate([data, np.full((num_examples, 1), vocab_size - 1)], axis=1)
        tensor = torch.from_numpy(inputs.astype(np.int64))
        super().__init__(tensor, tensor.clone())
