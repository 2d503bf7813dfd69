"""Synthetic tasks: MQAR (Zoology layout), selective copying and compression (MAD layout)."""

from __future__ import annotations

import pytest
import torch

from ess_reg.tasks import IGNORE_INDEX, MQAR, Compression, SelectiveCopying, accuracy, loss_fn


def test_mqar_layout_without_filler():
    k, length, vocab = 3, 24, 40
    task = MQAR(50, length, k, vocab, random_non_queries=False, seed=3)
    context = 2 * k
    for inputs, targets in zip(task.inputs, task.targets, strict=True):
        keys, values = inputs[0:context:2], inputs[1:context:2]
        assert ((keys >= 1) & (keys < vocab // 2)).all() and keys.unique().numel() == k
        assert ((values >= vocab // 2) & (values < vocab)).all() and values.unique().numel() == k
        scored = (targets != IGNORE_INDEX).nonzero().flatten()
        assert scored.numel() == k
        assert ((scored - context) % 2 == 0).all() and (scored >= context).all()
        for position in scored:
            key = inputs[position]
            slot = (keys == key).nonzero().item()
            assert targets[position] == values[slot]
        region = inputs[context:].clone()
        region[scored - context] = 0
        assert (region == 0).all()


def test_mqar_is_deterministic_and_filler_replaces_zeros():
    a, b = MQAR(20, 32, 4, 64, seed=7), MQAR(20, 32, 4, 64, seed=7)
    torch.testing.assert_close(a.inputs, b.inputs)
    assert not torch.equal(a.inputs, MQAR(20, 32, 4, 64, seed=8).inputs)
    plain = MQAR(20, 32, 4, 64, random_non_queries=False, seed=7)
    torch.testing.assert_close(a.targets, plain.targets)
    keep = plain.inputs != 0
    torch.testing.assert_close(a.inputs[keep], plain.inputs[keep])
    assert a.inputs.dtype == torch.int64 and len(a) == 20


def test_mqar_queries_cluster_after_the_prefix():
    task = MQAR(400, 64, 4, 256, random_non_queries=False, seed=0)
    first = (task.targets != IGNORE_INDEX).float().argmax(-1)
    assert (first == 8).float().mean() > 0.4  # p(slot 0) is about 0.25 per key


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"seq_len": 15}, "even"),
        ({"vocab_size": 64, "seq_len": 64}, "must exceed seq_len"),
        ({"num_kv_pairs": 17, "seq_len": 64}, "must be <= seq_len"),
        ({"num_examples": 0}, "num_examples must be a positive int"),
        ({"power_a": 0}, "power_a"),
    ],
)
def test_mqar_preconditions(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        MQAR(**{"num_examples": 2, "seq_len": 64, "num_kv_pairs": 4, "vocab_size": 256, **kwargs})


def test_selective_copying_layout():
    n, length, vocab = 4, 20, 8
    task = SelectiveCopying(30, length, n, vocab, seed=1)
    blank, copy = vocab - 2, vocab - 1
    for inputs, targets in zip(task.inputs, task.targets, strict=True):
        region = inputs[: length - n - 1]
        data = region[region != blank]
        assert data.numel() == n and (data < vocab - 2).all()
        assert region[-1] != blank  # the last data token sits right before the marker
        assert inputs[length - n - 1] == copy and (inputs[length - n:] == blank).all()
        torch.testing.assert_close(targets[length - n:], data)
        assert (targets[: length - n] == IGNORE_INDEX).all()
    with pytest.raises(ValueError, match="must exceed 2"):
        SelectiveCopying(2, 9, 4, 8)


def test_compression_layout():
    task = Compression(10, 12, 16, seed=0)
    assert (task.inputs[:, -1] == 15).all() and (task.inputs[:, :-1] < 15).all()
    torch.testing.assert_close(task.targets, task.inputs)
    assert task.backbone == "autoencoder"


def test_accuracy_counts_scored_positions_per_example():
    targets = torch.tensor([[IGNORE_INDEX, 2, 3], [1, IGNORE_INDEX, IGNORE_INDEX]])
    logits = torch.zeros(2, 3, 5)
    logits[0, 1, 2] = logits[0, 2, 0] = logits[1, 0, 1] = 1.0
    assert accuracy(logits, targets).item() == pytest.approx((0.5 + 1.0) / 2)
    assert torch.isfinite(loss_fn(logits, targets))
    with pytest.raises(ValueError, match="disagree"):
        accuracy(logits[:, :2], targets)
