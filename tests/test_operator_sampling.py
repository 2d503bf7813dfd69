"""``ESSRegularizer(max_operators=K)``: a uniform random subset of a layer's batch x channel
operators per step, an unbiased estimate of the full penalty, equal in both modes."""

from __future__ import annotations

import pytest
import torch

from ess_reg import DenseOperator, ESSRegularizer, capture_operators, ess_curve
from ess_reg.functional import split_capacity
from ess_reg.models import SequenceModel
from ess_reg.regularizer.sampling import layer_generator, sample_operators

VOCAB = 40
SPLITS = [3, 8, 13, 19]


def _model() -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel("gla", d_model=32, n_layers=2, vocab_size=VOCAB).double()  # 4 heads


def _ids(batch: int = 6, length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))


def _per_operator_utilization(op, splits) -> torch.Tensor:
    """``[B, C]``: each operator's entropy-ESS / capacity averaged over ``splits``."""
    index = torch.tensor(splits)
    return (ess_curve(op, splits=index) / split_capacity(op, index)).mean(-1)


def test_more_room_than_operators_changes_nothing():
    ids = _ids()
    full = ESSRegularizer(_model(), splits=SPLITS)
    roomy = ESSRegularizer(_model(), splits=SPLITS, max_operators=24)  # 6 examples x 4 heads
    for reg in (full, roomy):
        reg.model(ids)
    assert torch.equal(full(), roomy())
    assert roomy.generator.get_state().equal(torch.Generator().manual_seed(0).get_state())  # nothing drawn


def test_the_sample_is_the_mean_over_the_drawn_operators_and_unbiased():
    ids = _ids()
    with torch.no_grad():
        ops = capture_operators(_model(), ids)
    per_op = {name: _per_operator_utilization(op, SPLITS) for name, op in ops.items()}  # [6, 4] each
    reg = ESSRegularizer(_model(), splits=SPLITS, max_operators=5, target="min", weight=1.0)
    draws = []
    for step in range(100):
        reg.model(ids)
        penalty = reg()
        expected = []
        for name in ops:
            rows = torch.randperm(24, generator=layer_generator(0, step, name))[:5]
            expected.append(per_op[name].reshape(-1)[rows].mean())
        assert penalty.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-10), step
        draws.append(penalty.item())
    full = torch.stack([u.mean() for u in per_op.values()]).mean().item()
    mean = sum(draws) / len(draws)
    spread = torch.tensor(draws).std().item() / len(draws) ** 0.5
    assert abs(mean - full) < 4 * spread and spread > 0


@pytest.mark.parametrize("splits", ["fixed", "per_example", "random"])
def test_both_modes_draw_the_same_operators(splits):
    from test_regularizer_options import _assert_modes_agree

    ids = _ids(length=24)
    def per_example(x):
        return torch.stack([torch.tensor([2 + i, 11, 20 - i]) for i in range(x.shape[0])])

    splits = {"fixed": SPLITS, "random": 4, "per_example": per_example}[splits]
    _assert_modes_agree(ids[:4], steps=3, splits=splits, max_operators=3, weight=0.3)


def test_both_modes_agree_when_only_some_layers_are_sampled():
    """A hybrid whose second layer is sampled and first is not: the visiting order (forward order
    in loss-term mode, backward order attached) must not change the random splits or operators."""
    ids = _ids(batch=4)
    grads = {}
    for mode in ("loss_term", "attached"):
        torch.manual_seed(0)
        model = SequenceModel(["gla", "s6"], d_model=16, n_layers=2, vocab_size=VOCAB, d_state=4).double()
        reg = ESSRegularizer(model, splits=4, max_operators=10, weight=0.3)  # gla: 16 operators, s6: 128
        if mode == "attached":
            reg.attach()
        for _ in range(2):
            model.zero_grad()
            loss = model(ids).square().mean() * 0
            if mode == "loss_term":
                loss = loss + reg()
            loss.backward()
            if mode == "attached":
                reg.advance()
        grads[mode] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["loss_term"], grads["attached"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("target", [0.5, ("at_least", 0.9)])
def test_auto_leaves_non_linear_targets_exact(target):
    """f(mean of a sample) is biased for a float target or a floor, so "auto" does not sample
    those layers; an explicit count still does (documented)."""
    torch.manual_seed(0)
    model = SequenceModel("sa", d_model=16, n_layers=1, vocab_size=VOCAB)
    ids = torch.randint(0, VOCAB, (8, 320), generator=torch.Generator().manual_seed(0))
    model(ids)
    for option, sampled in (("auto", False), (4, True)):
        reg = ESSRegularizer(model, splits=8, target=target, max_operators=option)
        model(ids)
        op = next(iter(reg._pending.values()))[0][0]
        assert (reg._sample("blocks.0.mixer", op, None) is not None) is sampled
        reg.remove()


def test_per_example_splits_weigh_each_drawn_operator_at_its_own_splits():
    ids = _ids(batch=4)
    rows_splits = torch.tensor([[3, 9], [5, 9], [9, 17], [2, 21]])
    with torch.no_grad():
        ops = capture_operators(_model(), ids)
    reg = ESSRegularizer(_model(), splits=lambda x: rows_splits, max_operators=6, target="min", weight=1.0)
    reg.model(ids)
    penalty = reg()
    expected = []
    for name, op in ops.items():
        rows = torch.randperm(16, generator=layer_generator(0, 0, name))[:6]
        per_op = torch.stack([_per_operator_utilization(op, rows_splits[b].tolist())[b] for b in range(4)])
        expected.append(per_op.reshape(-1)[rows].mean())
    assert penalty.item() == pytest.approx(torch.stack(expected).mean().item(), rel=1e-10)


def test_operators_of_other_types_all_count():
    class Opaque(DenseOperator):
        def rebuild(self, tensors):
            raise NotImplementedError

    class Conv(DenseOperator):  # a subclass with its own state size, which a rebuilt subset would lose
        state_size = 3

    for kind in (Opaque, Conv):
        assert sample_operators(kind(torch.randn(3, 2, 8, 8).tril()), 2, torch.Generator()) is None
    sub, rows = sample_operators(DenseOperator(torch.randn(3, 2, 8, 8).tril()), 4, torch.Generator())
    assert tuple(sub.shape) == (4,) and rows[1] == 3 and rows[0].shape == (4,)
    sub, rows = sample_operators(DenseOperator(torch.randn(5, 8, 8).tril()), 2, torch.Generator())
    assert tuple(sub.shape) == (2,) and rows is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all"])
def test_bad_max_operators_is_named(bad):
    with pytest.raises(ValueError, match="max_operators"):
        ESSRegularizer(_model(), max_operators=bad)


def test_a_resumed_run_draws_what_the_uninterrupted_one_did_even_mid_accumulation():
    ids = _ids()
    whole = ESSRegularizer(_model(), splits=SPLITS, max_operators=5, accumulation_steps=2)
    values = []
    for _ in range(3):
        whole.model(ids)
        values.append(whole())
    cut = ESSRegularizer(_model(), splits=SPLITS, max_operators=5, accumulation_steps=2)
    cut.model(ids)
    cut()
    resumed = ESSRegularizer(_model(), splits=SPLITS, max_operators=5, accumulation_steps=2)
    resumed.load_state_dict(cut.state_dict())
    for expected in values[1:]:
        resumed.model(ids)
        assert torch.equal(resumed(), expected)


def test_config_and_resume_keep_the_draws():
    ids = _ids()
    first = ESSRegularizer(_model(), splits=SPLITS, max_operators=4)
    assert first.config["max_operators"] == 4
    first.model(ids)
    first()
    state = first.state_dict()
    first.model(ids)
    expected = first()
    second = ESSRegularizer(_model(), splits=SPLITS, max_operators=4)
    second.load_state_dict(state)
    second.model(ids)
    assert torch.equal(second(), expected)


def test_auto_keeps_each_layers_cost_near_the_budget():
    from ess_reg import DiagonalRealization
    from ess_reg.regularizer.sampling import AUTO_BUDGET, operator_cost, operator_count

    def realization(batch, channels, length, state):
        shape = (batch, channels, length, state)
        return DiagonalRealization(torch.randn(shape), torch.randn(shape), -torch.rand(shape), validate=False)

    gla = realization(32, 4, 256, 8)  # the default MQAR model: every operator
    assert operator_count("auto", gla, 8) is None
    mamba = realization(4, 512, 512, 16)  # a Mamba layer of d_inner 512 at batch 4
    kept = operator_count("auto", mamba, 8)
    assert 150 <= kept <= 250 and kept * operator_cost(mamba, 8) <= AUTO_BUDGET
    attention = DenseOperator(torch.randn(32, 4, 256, 256).tril(), validate=False)
    assert operator_count("auto", attention, 8) == 8  # the floor
    assert operator_count(None, mamba, 8) is None and operator_count(100, mamba, 8) == 100
    assert operator_count(5000, mamba, 8) is None  # room for all 2048


def test_auto_samples_an_attention_model_by_default():
    torch.manual_seed(0)
    model = SequenceModel("sa", d_model=16, n_layers=1, vocab_size=VOCAB)
    reg = ESSRegularizer(model, splits=8)
    assert reg.max_operators == "auto"
    ids = torch.randint(0, VOCAB, (8, 320), generator=torch.Generator().manual_seed(0))
    model(ids)
    op = next(iter(reg._pending.values()))[0][0]
    sampled = reg._sample("blocks.0.mixer", op, None)
    assert sampled is not None and tuple(sampled[0].shape) == (8,)  # 8 of 8 x 4 heads
    assert torch.isfinite(reg())
