"""ESSRegularizer's options: floor targets, per-batch splits, weight schedules, per-layer values;
each equal in loss-term and attached modes."""

from __future__ import annotations

import pytest
import torch

from ess_reg import ESSOptimizer, ESSRegularizer, capture_operators, ess_curve
from ess_reg.functional import split_capacity
from ess_reg.models import SequenceModel
from ess_reg.tasks import MQAR

VOCAB = 40


def _model(n_layers: int = 2) -> SequenceModel:
    torch.manual_seed(0)
    return SequenceModel("gla", d_model=32, n_layers=n_layers, vocab_size=VOCAB).double()


def _ids(length: int = 24) -> torch.Tensor:
    return torch.randint(0, VOCAB, (4, length), generator=torch.Generator().manual_seed(1))


def _loss(model, ids):
    return model(ids).square().mean()


def _grads(mode: str, ids: torch.Tensor, steps: int = 1,
           **kwargs) -> tuple[list[torch.Tensor], ESSRegularizer]:
    """Gradients of the penalty alone (task loss * 0) after ``steps`` steps, in one mode."""
    model = _model()
    reg = ESSRegularizer(model, **kwargs)
    if mode == "attached":
        reg.attach()
    for _ in range(steps):
        model.zero_grad()
        loss = _loss(model, ids) * 0
        if mode == "loss_term":
            loss = loss + reg()
        loss.backward()
        if mode == "attached":
            reg.advance()
    return [p.grad.clone() for p in model.parameters()], reg


def _assert_modes_agree(ids, steps=1, **kwargs):
    term, reg_a = _grads("loss_term", ids, steps, **kwargs)
    attached, _reg_b = _grads("attached", ids, steps, **kwargs)
    for a, b in zip(term, attached, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-13)
    return term, reg_a


def test_floor_is_free_above_and_linear_below():
    ids = _ids()
    with torch.no_grad():
        ops = capture_operators(_model(), ids)
    reference = ESSRegularizer(_model(), splits=[4, 12, 20])
    values = {n: float(reference.utilization(op)) for n, op in ops.items()}
    low = min(values.values())
    above, _ = _grads("loss_term", ids, target=("at_least", low - 0.05), splits=[4, 12, 20], weight=1.0)
    assert all(float(g.abs().max()) == 0 for g in above)  # every layer clears the floor
    below, reg = _grads("loss_term", ids, target=("at_least", 1.0), splits=[4, 12, 20], weight=1.0)
    maxed, _ = _grads("loss_term", ids, target="max", splits=[4, 12, 20], weight=1.0)
    for a, b in zip(below, maxed, strict=True):  # relu(1 - v) = 1 - v below the floor
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert float(reg.last_penalty) == pytest.approx(1 - sum(values.values()) / 2, rel=1e-9)
    _assert_modes_agree(ids, target=("at_least", 0.9), splits=[4, 12, 20], weight=0.7)


def test_absolute_floor_with_normalize_false():
    ids = _ids()
    _, reg = _grads("loss_term", ids, target=("at_least", 100.0), normalize=False, splits=[6, 12])
    ess = {n: float(v) for n, v in reg.values.items()}
    assert float(reg.last_penalty) == pytest.approx(1e-2 * sum(100 - v for v in ess.values()) / 2)


def test_splits_per_batch_from_the_input():
    ids = _ids()
    rows = torch.tensor([[3, 9], [5, 5], [20, 2], [11, 17]])
    _, reg = _assert_modes_agree(ids, splits=lambda inputs: rows[: inputs.shape[0]], weight=1.0)
    with torch.no_grad():
        ops = capture_operators(_model(), ids)
    for name, op in ops.items():
        per_example = []
        for b in range(4):
            curve = ess_curve(op.dense()[b], splits=rows[b]) / split_capacity(op, rows[b])
            per_example.append(curve.mean())
        assert float(reg.values[name]) == pytest.approx(float(torch.stack(per_example).mean()), rel=1e-9)


def test_reg_accepts_splits_for_the_last_forward_and_checks_them():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0)
    _loss(model, ids)
    shared = reg(splits=torch.tensor([7]))
    fixed = ESSRegularizer(_model(), weight=1.0, splits=[7])
    _loss(fixed.model, ids)
    assert float(shared) == pytest.approx(float(fixed()), rel=1e-12)
    _loss(model, ids)
    with pytest.raises(ValueError, match=r"splits gave split indices from 0 to 7; .*1 \.\. 23"):
        reg(splits=torch.tensor([[0, 7]] * 4))
    _loss(model, ids)
    with pytest.raises(ValueError, match="integer split indices"):
        reg(splits=torch.tensor([1.5]))


def test_mqar_boundary_splits():
    task = MQAR(8, 32, 4, 64, seed=0)
    assert task.context_length == 8
    assert task.boundary_splits(task.inputs[:3]).tolist() == [[8]] * 3
    model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=64)
    reg = ESSRegularizer(model, splits=task.boundary_splits)
    model(task.inputs[:4])
    assert torch.isfinite(reg())


@pytest.mark.parametrize(("schedule", "factors"), [
    ("constant", [1, 1, 1, 1, 1]),
    ("linear_decay", [1, 0.75, 0.5, 0.25, 0]),
    ("cosine_decay", [1, 0.8535533905932737, 0.5, 0.14644660940672627, 0]),
])
def test_weight_schedules(schedule, factors):
    reg = ESSRegularizer(_model(), schedule=schedule, total_steps=4)
    assert [reg.factor(k) for k in range(5)] == pytest.approx(factors)
    custom = ESSRegularizer(_model(), schedule=lambda step: 2.0 if step < 2 else 0.0)
    assert [custom.factor(k) for k in range(3)] == [2.0, 2.0, 0.0] and not custom.is_active(2)


def test_decayed_steps_build_nothing_and_modes_agree():
    ids = _ids()
    model = _model()
    reg = ESSRegularizer(model, weight=1.0, splits=3, schedule="linear_decay", total_steps=2)
    penalties = []
    for _ in range(3):
        _loss(model, ids)
        penalties.append(float(reg()))
    assert penalties[0] > 0 and penalties[1] == pytest.approx(0.5 * penalties[0], rel=0.5)
    assert penalties[2] == 0 and not reg._pending and not reg.operators.get("_")
    _assert_modes_agree(ids, steps=2, splits=[5, 9], schedule="cosine_decay", total_steps=3)


def test_per_layer_weights_and_targets():
    ids = _ids()
    names = ["blocks.0.mixer", "blocks.1.mixer"]
    only_second = ESSRegularizer(_model(), weight={names[1]: 2.0})
    assert list(only_second.modules) == [names[1]]
    _term, reg = _assert_modes_agree(ids, weight={names[0]: 0.5, names[1]: 2.0},
                                    target=lambda name: ("at_least", 0.95) if name == names[0] else "max",
                                    splits=[6, 14])
    v = {n: float(x) for n, x in reg.values.items()}
    expected = (0.5 * max(0.0, 0.95 - v[names[0]]) + 2.0 * (1 - v[names[1]])) / 2
    assert float(reg.last_penalty) == pytest.approx(expected, rel=1e-9)
    _assert_modes_agree(ids, weight=lambda name: 1.0 if name.startswith("blocks.1") else 0.0, splits=[6])


def test_option_errors_name_the_argument():
    model = _model()
    with pytest.raises(ValueError, match=r"target must be .*\('at_least', u\)"):
        ESSRegularizer(model, target=("at_most", 0.5))
    with pytest.raises(ValueError, match=r"target\['blocks.1.mixer'\] must be"):
        ESSRegularizer(model, target={"blocks.1.mixer": "more"})
    with pytest.raises(ValueError, match=r"weight names layers that are not regularized mixers: \['nope'\]"):
        ESSRegularizer(model, weight={"nope": 1.0})
    with pytest.raises(ValueError, match="zero weight"):
        ESSRegularizer(model, weight={"blocks.0.mixer": 0.0})
    with pytest.raises(ValueError, match="needs total_steps"):
        ESSRegularizer(model, schedule="linear_decay")
    with pytest.raises(ValueError, match="schedule must be one of"):
        ESSRegularizer(model, schedule="step")
    reg = ESSRegularizer(model, schedule=lambda step: -1.0)
    with pytest.raises(ValueError, match="schedule returned -1.0 at step 0"):
        reg.is_active()


def test_options_work_through_ess_optimizer():
    model, ids = _model(), _ids()
    task = MQAR(4, 24, 2, VOCAB, seed=0)
    reg = ESSRegularizer(model, weight={"blocks.0.mixer": 1.0}, target=("at_least", 0.9),
                         splits=task.boundary_splits, schedule="cosine_decay", total_steps=4)
    opt = ESSOptimizer(torch.optim.SGD(model.parameters(), lr=1e-2), reg)
    for _ in range(5):
        _loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    assert reg.step_count == 5 and all(torch.isfinite(p).all() for p in model.parameters())


def test_ess_regularizer_and_transition_penalty_on_the_same_layers():
    """Two hooks asking one mixer for its operator and its transition: each gets what it asked."""
    from ess_reg import TransitionPenalty

    model, ids = _model(), _ids()
    ess, transition = ESSRegularizer(model, splits=3), TransitionPenalty(model, 0.1)
    _loss(model, ids)
    assert float(transition()) > 0 and float(ess()) > 0
    second = ESSRegularizer(model, splits=3)  # hooked after the transition penalty
    _loss(model, ids)
    assert float(second()) > 0 and float(transition()) > 0 and float(ess()) > 0


def test_numpy_and_tensor_numbers_are_numbers_and_bad_splits_say_so():
    import numpy as np

    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=np.float32(0.5), schedule=lambda step: torch.tensor(0.5), splits=4)
    assert reg.factor(0) == 0.5 and reg.layer_weights["blocks.0.mixer"] == 0.5
    none = ESSRegularizer(_model(), splits=lambda inputs: None)
    with pytest.raises(ValueError, match="splits gave None"):
        _loss(none.model, ids)
    empty = ESSRegularizer(_model(), splits=lambda inputs: torch.zeros(4, 0, dtype=torch.long))
    _loss(empty.model, ids)
    with pytest.raises(ValueError, match=r"\[B, S\].*S >= 1"):
        empty()


def test_splits_callable_reads_input_ids_passed_by_keyword():
    """Hugging Face models are called as model(input_ids=..., labels=...)."""
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1,
                                         vocab_size=VOCAB, expand=2)).double()
    seen = []

    def at_boundary(input_ids):
        seen.append(tuple(input_ids.shape))
        return torch.full((input_ids.shape[0], 1), 5)

    reg = ESSRegularizer(model, splits=at_boundary, weight=1.0)
    ids = _ids(length=12)
    model(input_ids=ids, labels=ids)
    penalty = reg()
    assert seen == [(4, 12)] and torch.isfinite(penalty)
    fixed = ESSRegularizer(model, splits=[5], weight=1.0)
    model(input_ids=ids)
    assert float(fixed()) == pytest.approx(float(penalty), rel=1e-10)


def test_a_failed_call_changes_nothing_and_last_penalty_means_one_thing():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0, splits=3)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no operator"):
            reg()
    assert reg.step_count == 0
    _loss(model, ids)
    with pytest.raises(ValueError, match="split indices"):
        reg(splits=torch.tensor([0]))
    assert reg.step_count == 0 and reg._pending  # a corrected call still finds the forward
    assert torch.isfinite(reg(splits=torch.tensor([3])))
    penalties = {}
    for mode in ("loss_term", "attached"):
        model = _model()
        reg = ESSRegularizer(model, weight=1.0, splits=[4, 9], accumulation_steps=2)
        if mode == "attached":
            reg.attach()
        for half in (ids[:2], ids[2:]):
            loss = _loss(model, half)
            if mode == "loss_term":
                loss = loss + reg()
            loss.backward()
        if mode == "attached":
            reg.advance()
        penalties[mode] = float(reg.last_penalty)
    assert penalties["attached"] == pytest.approx(penalties["loss_term"], rel=1e-12)


def test_pickling_names_an_unpicklable_option_and_config_is_plain_data():
    import json
    import pickle

    from ess_reg.tasks import BoundarySplits

    model = _model()
    reg = ESSRegularizer(model, splits=lambda ids: torch.full((ids.shape[0], 1), 4))
    with pytest.raises(TypeError, match="its splits= is <function.*module-level function"):
        pickle.dumps(model)
    json.dumps(reg.config)
    reg.remove()
    fine = ESSRegularizer(_model(), splits=BoundarySplits(4), schedule="cosine_decay", total_steps=9)
    again = pickle.loads(pickle.dumps(fine))
    assert again.splits.boundary == 4 and again.factor(9) == 0
    assert json.dumps(fine.config)


def test_targets_accept_numpy_and_tensor_numbers():
    import numpy as np

    model, ids = _model(), _ids()
    for target in (np.float32(0.5), torch.tensor(0.5), ("at_least", np.float64(0.9))):
        reg = ESSRegularizer(model, target=target, splits=[5])
        _loss(model, ids)
        assert torch.isfinite(reg())
        reg.remove()
