"""ESSMetric: the torchmetrics contract, agreement with the functional API, DDP with gloo."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics import MetricCollection

from ess_reg import ESSMetric, average_ess, capture_operators, ess_curve, total_ess, utilization
from ess_reg.functional import ess_summary
from ess_reg.models import SequenceModel


def _model(seed=0):
    torch.manual_seed(seed)
    return SequenceModel(["gla", "sa"], d_model=32, n_layers=2, vocab_size=50)


def _batches(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (3, 20), generator=g) for _ in range(n)]


def _operators(model, ids):
    with torch.no_grad():
        return capture_operators(model, ids)


def test_metric_equals_functional_over_the_same_data():
    model = _model()
    metric = ESSMetric()
    batches = _batches()
    for ids in batches:
        metric.update(_operators(model, ids))
    result = metric.compute()
    everything = _operators(model, torch.cat(batches))
    for name, op in everything.items():
        torch.testing.assert_close(result[f"{name}/ess"], average_ess(op).mean().double(), rtol=1e-5, atol=0)
        torch.testing.assert_close(result[f"{name}/total_ess"], total_ess(op).double(), rtol=1e-5, atol=0)
        torch.testing.assert_close(result[f"{name}/utilization"], utilization(op).mean().double(),
                                   rtol=1e-5, atol=0)
    assert result["blocks.0.mixer/tss"] == model.mixers[0].state_size
    assert "blocks.1.mixer/tss" not in result  # softmax attention has no finite state
    torch.testing.assert_close(result["ess/total"],
                               result["blocks.0.mixer/total_ess"] + result["blocks.1.mixer/total_ess"])


def test_kinds_curve_and_single_operator():
    model = _model()
    ops = _operators(model, _batches(1)[0])
    metric = ESSMetric(kind="both", splits=5, curve=True)
    metric.update(ops)
    result = metric.compute()
    for name, op in ops.items():
        curve = ess_curve(op, splits=5).double().mean(dim=(0, 1))
        torch.testing.assert_close(result[f"{name}/curve"], curve, rtol=1e-5, atol=0)
        tol = ess_curve(op, "tolerance", splits=5).double().mean()
        torch.testing.assert_close(result[f"{name}/ess_tolerance"], tol)
    assert "ess/mean_utilization_tolerance" in result
    single = ESSMetric()
    single.update(ops["blocks.0.mixer"])
    assert set(single.compute()) >= {"operator/ess", "operator/utilization", "ess/total"}


def test_forward_reset_collection_state_dict_and_pickle():
    model = _model()
    first, second = (_operators(model, ids) for ids in _batches(2))
    metric = ESSMetric()
    batch_value = metric(first)
    assert set(batch_value) == set(ESSMetric().__class__()(first))
    metric(second)
    accumulated = metric.compute()
    reference = ESSMetric()
    reference.update(first)
    reference.update(second)
    for key, value in reference.compute().items():
        torch.testing.assert_close(accumulated[key], value)
    metric.reset()
    metric.update(first)
    torch.testing.assert_close(metric.compute()["ess/total"], batch_value["ess/total"])
    collection = MetricCollection({"ess": ESSMetric()}, prefix="train/")
    collection.update(first)
    assert "train/blocks.0.mixer/ess" in collection.compute()
    assert set(metric.state_dict()) == {"_extra_state"}  # the layer registry; states are not persistent
    clone = pickle.loads(pickle.dumps(metric))
    torch.testing.assert_close(clone.compute()["ess/total"], metric.compute()["ess/total"])
    with pytest.raises(RuntimeError, match="Can't change const"):
        metric.higher_is_better = True
    assert metric.clone() is not metric


def test_plot_returns_figure_and_axes():
    model = _model()
    ops = _operators(model, _batches(1)[0])
    for curve in (True, False):
        metric = ESSMetric(curve=curve)
        metric.update(ops)
        fig, ax = metric.plot()
        assert fig is not None and ax is not None


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be"):
        ESSMetric(kind="rank")
    with pytest.raises(ValueError, match="Unexpected keyword"):
        ESSMetric(bogus=1)
    with pytest.raises(ValueError, match="empty dict"):
        ESSMetric().update({})
    with pytest.raises(TypeError, match="operator"):
        ESSMetric().update({"x": [1, 2]})


def test_summary_functional():
    op = _operators(_model(), _batches(1)[0])["blocks.0.mixer"]
    summary = ess_summary(op, splits=4)
    assert summary["tss"] == op.state_size and summary["curve"].shape == (4,)
    with pytest.raises(ValueError, match="kind"):
        ess_summary(op, "both")


def _rank_updates(scenario: str, rank: int, world: int):
    """The operator dicts rank ``rank`` feeds its metric in ``scenario``."""
    if scenario == "even":  # each rank a share of the batches
        model = _model()
        return [_operators(model, ids) for ids in _batches(4)[rank::world]]
    # "uneven": rank 0 meets the layers in reverse order (renamed so the orders differ), rank 1 none
    if rank != 0:
        return []
    updates = []
    for ids in _batches(3):
        operators = _operators(_model(), ids)
        updates += [{"z": operators["blocks.1.mixer"]}, {"a": operators["blocks.0.mixer"]}]
    return updates


def _ddp_worker(rank: int, world: int, init_file: str, out_file: str, scenario: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        metric = ESSMetric(kind="both", curve=True, splits=6)
        for operators in _rank_updates(scenario, rank, world):
            metric.update(operators)
        result = metric.compute()
        if rank == 0:
            torch.save(result, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["even", "uneven"])
def test_distributed_sync_equals_single_process(tmp_path, scenario):
    """Uneven: layers met in other orders on different ranks, and a rank with no update."""
    out = tmp_path / "ddp.pt"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), scenario), nprocs=2, join=True)
    synced = torch.load(out)
    single = ESSMetric(kind="both", curve=True, splits=6)
    for rank in range(2):
        for operators in _rank_updates(scenario, rank, 2):
            single.update(operators)
    expected = single.compute()
    assert synced.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(synced[key], value, rtol=1e-10, atol=1e-12)


def test_merge_and_load_into_fresh_metrics():
    model = _model()
    first, second = (_operators(model, ids) for ids in _batches(2))
    metric = ESSMetric(kind="both", curve=True, splits=5)
    metric.update(first)
    metric.update(second)
    expected = metric.compute()
    merged = ESSMetric(kind="both", curve=True, splits=5)
    merged.merge_state(metric)
    metric.persistent(True)
    loaded = ESSMetric(kind="both", curve=True, splits=5)
    loaded.load_state_dict(metric.state_dict())
    for other in (merged, loaded):
        got = other.compute()
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            torch.testing.assert_close(got[key], value)


def test_long_dense_layers_warn_about_all_splits():
    import warnings

    from conftest import random_causal

    long_dense = random_causal(1, 300, seed=3)
    with pytest.warns(UserWarning, match="splits=64"):
        ESSMetric().update(long_dense)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ESSMetric(splits=8).update(long_dense)
        ESSMetric().update(random_causal(1, 40, seed=3))


def test_curve_with_another_length_is_refused_by_name():
    metric = ESSMetric(curve=True, splits=4)
    metric.update({"mix": torch.randn(2, 8, 8, dtype=torch.float64).tril()})
    for length in (12, 6):
        with pytest.raises(ValueError, match=rf"curve=True.*'mix'.*L = {length}.*splits=\["):
            metric.update({"mix": torch.randn(2, length, length, dtype=torch.float64).tril()})
    fixed = ESSMetric(curve=True, splits=[1, 3, 5])
    for length in (8, 12):
        fixed.update({"mix": torch.randn(2, length, length, dtype=torch.float64).tril()})
    assert fixed.compute()["mix/curve"].shape == (3,)


def test_update_under_forward_builds_no_graph(monkeypatch):
    import ess_reg.metric as metric_module

    weights = torch.randn(2, 3, 8, 8, dtype=torch.float64).tril().requires_grad_()
    metric = ESSMetric(splits=3)
    seen = []
    original = metric_module._ess_update

    def spy(*args, **kwargs):
        seen.append(torch.is_grad_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(metric_module, "_ess_update", spy)
    batch = metric({"mix": weights * 2})
    assert seen and not any(seen)
    assert all(not v.requires_grad for v in batch.values())
    assert all(not getattr(metric, s).requires_grad for s in metric._defaults)


def test_curves_of_other_split_positions_are_not_merged_and_reset_forgets_them():
    short, long = ESSMetric(curve=True, splits=4), ESSMetric(curve=True, splits=4)
    short.update({"mix": torch.randn(2, 16, 16, dtype=torch.float64).tril()})
    long.update({"mix": torch.randn(2, 32, 32, dtype=torch.float64).tril()})
    with pytest.raises(ValueError, match="curve=True.*'mix'.*cannot be added"):
        short.merge_state(long)
    short.reset()
    short.update({"mix": torch.randn(2, 32, 32, dtype=torch.float64).tril()})  # another length now
    short.merge_state(long)
    assert short.compute()["mix/curve"].shape == (4,)
