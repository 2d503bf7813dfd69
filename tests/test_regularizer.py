"""ESSRegularizer (loss-term and backward-pass modes) and TransitionPenalty."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from ess_reg import ESSRegularizer, TransitionPenalty
from ess_reg.mixers import GatedLinearAttention, SoftmaxAttention
from ess_reg.models import SequenceModel


def _model(mixer="gla", seed=0):
    torch.manual_seed(seed)
    return SequenceModel(mixer, d_model=32, n_layers=2, vocab_size=40).double()


def _ids(seed=1, length=24):
    return torch.randint(0, 40, (4, length), generator=torch.Generator().manual_seed(seed))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_penalty_is_differentiable_and_reports_values():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=0.5, splits=6)
    model(ids)
    penalty = reg()
    assert penalty.requires_grad and 0 <= penalty.item() <= 0.5
    penalty.backward()
    grads = _grads(model)
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    assert set(reg.values) == {"blocks.0.mixer", "blocks.1.mixer"}
    assert all(0 <= float(v) <= 1 for v in reg.values.values())
    assert set(reg.operators) == set(reg.values)


@pytest.mark.parametrize("target", ["max", "min", 0.3])
@pytest.mark.parametrize("kind", ["entropy", "soft_tolerance"])
def test_target_direction(target, kind):
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0, kind=kind, target=target, splits=[4, 9, 15])
    model(ids)
    penalty = reg()
    values = torch.stack(list(reg.values.values()))
    expected = {"max": (1 - values).mean(), "min": values.mean()}.get(target)
    if expected is None:
        expected = ((values - 0.3) ** 2).mean()
    torch.testing.assert_close(penalty.detach(), expected)


def test_gradient_descent_on_max_raises_ess():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0, splits=[6, 12, 18])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    model(ids)
    first = reg()
    for _ in range(15):
        optimizer.zero_grad()
        model(ids)
        reg().backward()
        optimizer.step()
    model(ids)
    assert reg().item() < first.item()


def test_attach_mode_gradients_equal_loss_term_gradients():
    base, ids = _model(), _ids()
    for kind in ("entropy", "soft_tolerance"):
        loss_model, attach_model = copy.deepcopy(base), copy.deepcopy(base)
        loss_reg = ESSRegularizer(loss_model, weight=0.7, kind=kind, splits=[3, 8, 13, 20])
        (loss_model(ids).pow(2).mean() + loss_reg()).backward()
        attach_reg = ESSRegularizer(attach_model, weight=0.7, kind=kind, splits=[3, 8, 13, 20]).attach()
        attach_model(ids).pow(2).mean().backward()
        expected, got = _grads(loss_model), _grads(attach_model)
        assert expected.keys() == got.keys()
        for name in expected:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-6, atol=1e-9)
        with pytest.raises(RuntimeError, match="attached"):
            attach_reg()


def test_attach_mode_with_random_splits_matches_after_the_same_draws():
    base, ids = _model(), _ids()
    models = [copy.deepcopy(base) for _ in range(2)]
    regs = [ESSRegularizer(m, weight=0.3, splits=5, generator=torch.Generator().manual_seed(4))
            for m in models]
    (models[0](ids).sum() * 0 + regs[0]()).backward()
    regs[1].attach()
    (models[1](ids).sum() * 0).backward()
    for name, grad in _grads(models[0]).items():
        torch.testing.assert_close(_grads(models[1])[name], grad, rtol=1e-6, atol=1e-9)


def test_schedule_skips_steps_and_computes_nothing():
    model, ids = _model(), _ids()
    reg = ESSRegularizer(model, weight=1.0, warmup_steps=2, every_n_steps=3)
    active = []
    for _ in range(9):
        model(ids)
        captured = bool(reg.operators) and reg.is_active()
        penalty = reg()
        active.append(penalty.item() != 0)
        assert captured == active[-1]
        reg.operators.clear()
    assert active == [False, False, True, False, False, True, False, False, True]


def test_no_grad_evaluation_and_modules_selection():
    model, ids = _model(["gla", "sa"]), _ids()
    reg = ESSRegularizer(model, modules=["blocks.1.mixer"])
    assert list(reg.modules) == ["blocks.1.mixer"]
    with torch.no_grad():
        model(ids)
    with pytest.raises(RuntimeError, match="no_grad"):  # nothing captured: an error, not a silent 0
        reg()
    assert list(ESSRegularizer(model, modules=GatedLinearAttention).modules) == ["blocks.0.mixer"]
    assert list(ESSRegularizer(model, modules=lambda n, m: isinstance(m, SoftmaxAttention)).modules) \
        == ["blocks.1.mixer"]
    model(ids)
    sa_reg = ESSRegularizer(model, modules=["blocks.1.mixer"], splits=4)
    model(ids)
    assert 0 <= sa_reg().item() <= 1e-2  # dense operator normalised by min(i, L - i)


def test_remove_context_manager_and_pickle():
    model, ids = _model(), _ids()
    with ESSRegularizer(model) as reg:
        assert any(m._forward_hooks for m in model.modules())
    assert not any(m._forward_hooks for m in model.modules())
    reg = ESSRegularizer(model, weight=0.2, splits=[2, 5])
    clone = pickle.loads(pickle.dumps(reg))
    assert clone.config == reg.config and clone.config["splits"] == [2, 5]
    clone.model(ids)
    assert clone().item() > 0
    clone.remove()
    pickle.dumps(reg.config)


@pytest.mark.parametrize(
    ("kwargs", "error", "pattern"),
    [
        ({"kind": "rank"}, ValueError, "kind must be one of"),
        ({"target": "up"}, ValueError, "target must be"),
        ({"splits": 0}, ValueError, "splits must be"),
        ({"every_n_steps": 0}, ValueError, "every_n_steps"),
        ({"weight": float("nan")}, ValueError, "weight"),
        ({"modules": ["blocks.0.norm1"]}, ValueError, "not a recognised mixer"),
        ({"modules": ["nope"]}, ValueError, "not a submodule"),
        ({"modules": 3}, TypeError, "modules must be"),
        ({"dtype": torch.float16}, ValueError, "dtype"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        ESSRegularizer(_model(), **kwargs)
    with pytest.raises(ValueError, match="no module ess-reg recognises"):
        ESSRegularizer(torch.nn.Linear(2, 2))


def test_transition_penalty_matches_definition():
    model, ids = _model(["gla", "ssd"]), _ids()
    penalty = TransitionPenalty(model, weight=2.0)
    model(ids)
    value = penalty()
    gla, ssd = model.mixers
    hidden = model.blocks[0].norm1(model.embedding(ids))
    a = gla.transition(hidden)
    first = torch.sqrt(((a - 1) ** 2).sum(-1)).mean()
    h2 = model.blocks[1].norm1(model.blocks[0](model.embedding(ids)))
    s = ssd.transition(h2)
    second = ((s[..., 0] - 1).abs() * ssd.state_size ** 0.5).mean()
    torch.testing.assert_close(value, 2.0 * (first + second) / 2)
    value.backward()
    assert model.mixers[0].gate[1].bias.grad is not None
    with pytest.raises(ValueError, match="no mixer with a state transition"):
        TransitionPenalty(_model("sa"))
    penalty.remove()
