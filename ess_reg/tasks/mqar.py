"""Multi-query associative recall (MQAR), laid out exactly as Zoology's generator."""

from __future__ import annotations

import numpy as np
import torch

from ess_reg.tasks.base import IGNORE_INDEX, SyntheticTask, require


class MQAR(SyntheticTask):
    """MQAR examples (Arora et al., Zoology layout).

    Layout: keys from ``1 .. V/2 - 1`` and values from ``V/2 .. V - 1`` (distinct within an example),
    the prefix ``k0 v0 k1 v1 ...`` repeated ``num_passes`` times (``C = 2 K passes`` tokens), then a
    query region where key ``k`` re-appears at position ``C + 2 s_k``, the slots ``s_k`` drawn
    without replacement with probability ``~ g^(power_a - 1)``. ``targets[C + 2 s_k] = v_k`` (the
    next-token convention); all other targets are -100, so ``K`` positions per example are scored.
    With ``random_non_queries`` the filler zeros of the inputs become uniform random tokens.

    Preconditions (as Zoology asserts): ``seq_len`` even, ``vocab_size > seq_len``,
    ``2 K passes + 2 K <= seq_len``. Fully determined by ``seed`` (one numpy generator for keys,
    values and slots, one torch generator for the filler).
    """

    def __init__(
        self,
        num_examples: int = 1000,
        seq_len: int = 64,
        num_kv_pairs: int = 4,
        vocab_size: int = 256,
        power_a: float = 0.01,
        random_non_queries: bool = True,
        num_passes: int = 1,
        seed: int = 0,
    ) -> None:
        for name, value in (("num_examples", num_examples), ("seq_len", seq_len),
                            ("num_kv_pairs", num_kv_pairs), ("num_passes", num_passes)):
            require(isinstance(value, int) and value >= 1, f"{name} must be a positive int, got {value!r}")
        require(seq_len % 2 == 0, f"seq_len must be even, got {seq_len}")
        require(vocab_size > seq_len, f"vocab_size ({vocab_size}) must exceed seq_len ({seq_len})")
        context = 2 * num_kv_pairs * num_passes
        require(context + 2 * num_kv_pairs <= seq_len,
                f"2 * num_kv_pairs * num_passes + 2 * num_kv_pairs = {context + 2 * num_kv_pairs} "
                f"must be <= seq_len ({seq_len}); use fewer kv pairs or a longer sequence")
        require(num_kv_pairs <= vocab_size // 2 - 1,
                f"num_kv_pairs ({num_kv_pairs}) must be <= vocab_size // 2 - 1 distinct keys")
        require(power_a > 0, f"power_a must be > 0, got {power_a}")
        self.num_kv_pairs, self.vocab_size, self.num_passes = num_kv_pairs, vocab_size, num_passes
        self.context_length = context
        inputs, targets = _generate(num_examples, seq_len, num_kv_pairs, vocab_size, power_a,
                                    random_non_queries, num_passes, seed)
        super().__init__(inputs, targets)

    def boundary_splits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The split between the key-value context and the queries, ``i = 2 K passes``, for every
        example of a batch: ``[B, 1]`` (a ``splits=`` callable for ``ESSRegularizer``: ``H_i`` maps
        what the context wrote to what the queries read, the memory the task needs)."""
        return BoundarySplits(self.context_length)(input_ids)


class BoundarySplits:
    """``f(input_ids) -> [B, 1]``: the fixed context/query boundary of MQAR-like batches (picklable)."""

    def __init__(self, boundary: int) -> None:
        if isinstance(boundary, bool) or not isinstance(boundary, int) or boundary < 1:
            raise ValueError(f"boundary must be an int >= 1, got {boundary!r}")
        self.boundary = boundary

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        batch = input_ids.shape[0] if isinstance(input_ids, torch.Tensor) and input_ids.dim() > 1 else 1
        device = input_ids.device if isinstance(input_ids, torch.Tensor) else None
        return torch.full((batch, 1), self.boundary, dtype=torch.long, device=device)

    def __repr__(self) -> str:
        return f"BoundarySplits({self.boundary})"


def _generate(n, seq_len, k, vocab, power_a, random_non_queries, passes, seed):
    rng = np.random.default_rng(seed)
    context = 2 * k * passes
    keys = np.stack([rng.choice(np.arange(1, vocab // 2), size=k, replace=False) for _ in range(n)])
    values = np.stack([rng.choice(np.arange(vocab // 2, vocab), size=k, replace=False)
                       for _ in range(n)])
    prefix = np.zeros((n, 2 * k), dtype=np.int64)
    prefix[:, 0::2], prefix[:, 1::2] = keys, values
    prefix = np.tile(prefix, (1, passes))
    space = (seq_len - context) // 2
    gaps = np.arange(1, space + 1, dtype=np.float64)
    weights = gaps ** (power_a - 1)
    weights /= weights.sum()
    slots = np.stack([rng.choice(space, size=k, replace=False, p=weights) for _ in range(n)])
    region = np.zeros((n, seq_len - context + 1), dtype=np.int64)
    rows = np.arange(n)[:, None]
    region[rows, 2 * slots] = keys
    inputs = np.concatenate([prefix, region], axis=1)[:, :seq_len]
    labels = np.full((n, seq_len + 1), IGNORE_INDEX, dtype=np.int64)
    labels[rows, context + 2 * slots + 1] = values
    inputs_t, targets_t = torch.from_numpy(inputs), torch.from_numpy(labels[:, 1:].copy())
    if random_non_queries:
        g = torch.Generator().manual_seed(seed)
        filler = torch.randint(0, vocab, inputs_t.shape, generator=g)
        inputs_t = torch.where(inputs_t == 0, filler, inputs_t)
    return inputs_t, targets_t
