"""Unbiased subsampling of a layer's operators: the penalty of a wide layer at a fraction of its cost.

A layer's utilization is a mean over its ``batch x channels`` operators (and the step's splits), so
the mean over a uniform random subset of them is an unbiased estimate of it, and so is the penalty
of a linear target (``"max"``, ``"min"``); the regularizer's cost falls in proportion. A non-linear
target (a float, a floor) of a sampled mean is biased upwards by the sample's variance, so
``max_operators="auto"`` leaves those layers exact. The subset is a function of the regularizer's
seed, the step and the layer's name, so the two modes (loss term, attached) pick the same operators
whatever order they visit the layers in, and a resumed run picks what the uninterrupted one did.
"""

from __future__ import annotations

import zlib

import torch

from ess_reg.operators import DenseOperator, DiagonalRealization, Operator, SoftmaxAttentionOperator

#: ``max_operators="auto"``: each layer's penalty may cost about this many multiply-adds a step
#: (:func:`operator_cost` per operator); wider layers are sampled down to it, never below
#: ``AUTO_MIN_OPERATORS``. A GLA layer of the usual sizes keeps every operator, a Mamba layer a few
#: hundred, a softmax-attention layer at ``L = 256`` about 8.
AUTO_BUDGET = 3e7
AUTO_MIN_OPERATORS = 8


def check_max_operators(value: object) -> int | str | None:
    """``"auto"``, ``None`` (every operator) or an int >= 1; otherwise a ValueError naming the option."""
    if value is None or (isinstance(value, str) and value == "auto"):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"max_operators must be 'auto', None (every operator) or an int >= 1, got {value!r}")
    return value


def operator_cost(op: Operator, splits: int) -> float:
    """Multiply-adds of one operator's penalty at ``splits`` splits, roughly: ``L N^2 + S N^3`` on
    the Gramian route (state ``N``), ``S (L/2) (L/4)^2`` on the dense route (the average split
    block, compressed to its short side)."""
    length, state = op.seq_len, op.state_size
    if state is not None and state < length // 2:
        return float(length * state ** 2 + splits * state ** 3)
    return float(splits * (length / 2) * (length / 4) ** 2)


def operator_count(max_operators: int | str | None, op: Operator, splits: int) -> int | None:
    """How many of ``op``'s operators to keep (None: all) under the option ``max_operators``."""
    if max_operators is None:
        return None
    if max_operators == "auto":
        max_operators = max(AUTO_MIN_OPERATORS, int(AUTO_BUDGET // operator_cost(op, splits)))
    total = 1
    for size in op.shape:
        total *= size
    return None if total <= max_operators else int(max_operators)


def layer_generator(seed: int, step: int, name: str) -> torch.Generator:
    """A CPU generator for layer ``name`` at ``step`` of a regularizer seeded with ``seed``."""
    mixed = (seed * 1_000_003 + step * 7_919 + zlib.crc32(name.encode())) % 2 ** 63
    return torch.Generator().manual_seed(mixed)


def is_linear(target: object) -> bool:
    """Whether a target's ``f`` is linear (``"max"``, ``"min"``): only then is ``f`` of a sampled
    mean an unbiased estimate of ``f`` of the full mean."""
    return isinstance(target, str) and target in ("max", "min")


def sample_operators(op: Operator, count: int, generator: torch.Generator
                     ) -> tuple[Operator, tuple[torch.Tensor, int] | None] | None:
    """``count`` of ``op``'s ``prod(op.shape)`` operators, drawn uniformly without replacement.

    Returns ``(subset, rows)``: ``subset`` has shape ``[count]`` (the operator's batch and channel
    dimensions flattened, in ascending order); ``rows`` is ``(batch_index, batch)``, the batch
    element of each ``[count]`` (on the operator's device) and the batch size, or None for an
    operator without a batch dimension.
    None when ``op`` has at most ``count`` operators, or is not one of the library's own operator
    types (a subclass may hold more than its tensors, e.g. its own ``state_size``, which a rebuilt
    subset would lose): then every operator counts.
    """
    if type(op) not in (DenseOperator, DiagonalRealization, SoftmaxAttentionOperator):
        return None
    shape = tuple(op.shape)
    total = 1
    for size in shape:
        total *= size
    if total <= count:
        return None
    tensors = op.tensors()
    if any(tuple(t.shape[: len(shape)]) != shape for t in tensors):
        return None
    rows = torch.randperm(total, generator=generator)[:count].sort().values  # on the CPU
    index = tuple(i.to(op.device, non_blocking=True) for i in torch.unravel_index(rows, shape))
    subset = op.rebuild([t[index] for t in tensors])
    return subset, ((index[0], shape[0]) if len(shape) > 1 else None)
