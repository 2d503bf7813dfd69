"""Selective copying (MAD suite layout)."""

from __future__ import annotations

import numpy as np
import torch

from ess_reg.tasks.base import IGNORE_INDEX, SyntheticTask, require


class SelectiveCopying(SyntheticTask):
    """Copy ``n`` data tokens scattered among blanks, in order, after a copy marker (MAD).

    Vocabulary: data ``0 .. V-3``, blank ``V-2``, copy marker ``V-1``. Inputs: a data region of
    ``L - n - 1`` tokens holding ``n`` data tokens (drawn with replacement) with ``L - 2n - 1``
    blanks, each blank inserted before a uniformly chosen data token (so the last data token always
    sits right before the marker), then the marker, then ``n`` blanks. Targets: the ``n`` data tokens
    at the last ``n`` positions (no shift, not teacher-forced), -100 elsewhere. Unlike MAD, the blank
    slots come from the same seeded generator as the tokens.
    """

    def __init__(self, num_examples: int = 1000, seq_len: int = 256, num_tokens_to_copy: int = 16,
                 vocab_size: int = 16, seed: int = 0) -> None:
        n = num_tokens_to_copy
        require(num_examples >= 1, f"num_examples must be >= 1, got {num_examples}")
        require(n >= 1, f"num_tokens_to_copy must be >= 1, got {n}")
        require(seq_len > 2 * n + 1, f"seq_len ({seq_len}) must exceed 2 * num_tokens_to_copy + 1 "
                f"({2 * n + 1})")
        require(vocab_size >= 3, f"vocab_size must be >= 3 (data, blank, copy), got {vocab_size}")
        self.vocab_size, self.num_tokens_to_copy = vocab_size, n
        rng = np.random.default_rng(seed)
        blank, copy = vocab_size - 2, vocab_size - 1
        blanks = seq_len - 2 * n - 1
        inputs = np.empty((num_examples, seq_len), dtype=np.int64)
        targets = np.full((num_examples, seq_len), IGNORE_INDEX, dtype=np.int64)
        for row in range(num_examples):
            data = rng.integers(0, vocab_size - 2, size=n)
            slots = rng.integers(0, n, size=blanks)
            region = np.insert(data, np.sort(slots), blank)
            inputs[row] = np.concatenate([region, [copy], np.full(n, blank)])
            targets[row, seq_len - n:] = data
        super().__init__(torch.from_numpy(inputs), torch.from_numpy(targets))
