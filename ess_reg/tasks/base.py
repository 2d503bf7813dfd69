"""Common pieces of the synthetic tasks: datasets of ``(inputs, targets)`` and accuracy."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

#: Targets at unscored positions.
IGNORE_INDEX = -100


class SyntheticTask(Dataset):
    """A pre-generated task: ``inputs`` and ``targets``, both ``[num_examples, L]`` int64.

    ``targets`` is ``IGNORE_INDEX`` (-100) wherever nothing is scored. Items are
    ``(inputs[i], targets[i])``.
    """

    #: The scored kind of model: ``"lm"`` (next-token style) or ``"autoencoder"``.
    backbone: str = "lm"

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.inputs, self.targets = inputs, targets

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[index], self.targets[index]

    @property
    def seq_len(self) -> int:
        return self.inputs.shape[1]


def accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over examples of the fraction of scored positions predicted right (Zoology's MQAR).

    ``logits``: ``[B, L, V]``; ``targets``: ``[B, L]`` with ``IGNORE_INDEX`` where unscored.
    Examples with no scored position are left out. Returns a scalar tensor.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits [B, L, V] and targets [B, L] disagree: {tuple(logits.shape)} vs {tuple(targets.shape)}"
        )
    scored = targets != IGNORE_INDEX
    correct = (logits.argmax(-1) == targets) & scored
    per_example = correct.sum(-1).float() / scored.sum(-1).clamp_min(1).float()
    has_scored = scored.any(-1)
    if not bool(has_scored.any()):
        return torch.tensor(float("nan"))
    return per_example[has_scored].mean()


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the scored positions."""
    return torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
    )


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
