"""init_schemes: the reference formulas, ess_init and init_weights_ess."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from timm.models import named_apply

from ess_reg.mixers import S4D, GatedLinearAttention, LinearAttention, SelectiveSSM, WeightedLinearAttention
from ess_reg.models import SequenceModel
from init_schemes import (
    SCHEMES,
    dt_bias_,
    ess_init,
    gla_gate_,
    hippo_legs,
    init_weights_ess,
    mamba2_A_log_,
    mamba_A_log_,
    projections_,
    retnet_decay_,
    s4d_A_,
    s4d_modes,
    wla_memory_,
)


def test_s4d_modes_match_the_formulas():
    n = torch.arange(4, dtype=torch.float64)
    half = -0.5 * torch.ones(4, dtype=torch.float64)
    torch.testing.assert_close(s4d_modes("lin", 8), torch.complex(half, math.pi * n))
    inv = s4d_modes("inv", 8)
    torch.testing.assert_close(inv.imag, (8 / math.pi) * (8 / (2 * n + 1) - 1))
    torch.testing.assert_close(s4d_modes("real", 8).real, -(n + 1))
    legs = s4d_modes("legs", 8)
    assert torch.allclose(legs.real, torch.full((4,), -0.5, dtype=torch.float64))
    A, B = hippo_legs(8)
    p = torch.sqrt(torch.arange(8, dtype=torch.float64) + 0.5)
    normal = A + p[:, None] * p[None, :]
    eig = torch.linalg.eigvals(normal)
    expected = eig[eig.imag > 0].imag.sort().values
    torch.testing.assert_close(legs.imag, expected)
    assert A[2, 1] == -math.sqrt(5) * math.sqrt(3) and A[1, 1] == -2 and A[1, 2] == 0
    torch.testing.assert_close(B, torch.sqrt(2 * torch.arange(8, dtype=torch.float64) + 1))
    with pytest.raises(ValueError, match="even"):
        s4d_modes("lin", 7)


def test_mamba_and_gate_initializers():
    A_log = torch.zeros(3, 4)
    mamba_A_log_(A_log)
    torch.testing.assert_close(-torch.exp(A_log[1]), -torch.arange(1.0, 5.0))
    bias = torch.zeros(20000, dtype=torch.float64)
    dt_bias_(bias, 1e-3, 1e-1, generator=torch.Generator().manual_seed(0))
    dt = torch.nn.functional.softplus(bias)
    assert dt.min() >= 1e-3 - 1e-12 and dt.max() <= 1e-1 + 1e-12
    assert abs(torch.log(dt).mean().item() - (math.log(1e-3) + math.log(1e-1)) / 2) < 0.05
    heads = torch.zeros(1000, dtype=torch.float64)
    mamba2_A_log_(heads, 1, 16, generator=torch.Generator().manual_seed(0))
    assert heads.exp().min() >= 1 and heads.exp().max() <= 16
    gla = GatedLinearAttention(32)
    gla_gate_(gla, normalizer=4, bias=2.0)
    assert gla.gate_logit_normalizer == 4 and (gla.gate[1].bias == 2).all()
    wla = WeightedLinearAttention(32)
    retnet_decay_(wla)
    decay = torch.exp(wla.log_decay())
    torch.testing.assert_close(decay[:, 0], (1 - 2.0 ** (-5 - torch.arange(4.0))), rtol=1e-5, atol=1e-6)
    wla_memory_(wla, 10, 10)
    torch.testing.assert_close(torch.exp(wla.log_decay()), torch.full_like(decay, 0.9), rtol=1e-5, atol=1e-6)
    s4d = S4D(8, d_state=8)
    s4d_A_(s4d.log_A_real, s4d.A_imag, "inv")
    torch.testing.assert_close(s4d.A_imag[5].double(), s4d_modes("inv", 8).imag, rtol=1e-6, atol=1e-5)


def test_projections_use_timm_helpers():
    layer = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
    projections_(layer, std=0.02)
    assert layer[0].weight.abs().max() <= 0.04 + 1e-6 and (layer[0].bias == 0).all()
    projections_(layer, "lecun")
    with pytest.raises(ValueError, match="mode"):
        projections_(layer, "xavier")


def _parameters(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("mixer", ["gla", "s6", "gla_s6", ["wla", "la"], ["ssd", "sa"]])
def test_auto_is_deterministic_and_touches_only_owned_parameters(mixer):
    torch.manual_seed(0)
    model = SequenceModel(mixer, d_model=32, n_layers=2, vocab_size=64)
    model.train()
    before = _parameters(model)
    rng_state = torch.get_rng_state()
    report = ess_init(model, seed=3, verbose=False)
    assert torch.equal(torch.get_rng_state(), rng_state) and model.training
    owned = ("A_log", "dt_proj.bias", "dt_bias", "gate.1.bias", "decay_logit", "log_A_real", "A_imag",
             "log_dt")
    for name, value in _parameters(model).items():
        if not any(name.endswith(o) for o in owned):
            assert torch.equal(value, before[name]), name
    for entry in report.layers:
        assert entry.after >= entry.before - 1e-12
    twin = SequenceModel(mixer, d_model=32, n_layers=2, vocab_size=64)
    twin.load_state_dict(dict(zip(before, before.values(), strict=True)), strict=False)
    ess_init(twin, seed=3, verbose=False)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert "utilization before" in str(report)


def test_named_schemes_and_errors():
    model = SequenceModel(["s4d", "s6"], d_model=16, n_layers=2, vocab_size=32)
    report = ess_init(model, scheme="s4d_legs", verbose=False)
    assert report["blocks.0.mixer"].scheme == "s4d_legs"
    assert report["blocks.1.mixer"].scheme.startswith("unchanged")
    expected = s4d_modes("legs", 64).imag.float()
    torch.testing.assert_close(model.mixers[0].A_imag[0], expected)
    assert set(SCHEMES) >= {"s4d_lin", "s4d_inv", "s4d_real", "s4d_legs", "mamba", "mamba2", "gla",
                            "retnet", "wla", "la", "default"}
    with pytest.raises(ValueError, match="scheme must be"):
        ess_init(model, scheme="xavier", verbose=False)
    with pytest.raises(ValueError, match="objective"):
        ess_init(model, objective="loss", verbose=False)
    with pytest.raises(ValueError, match="no module ess-reg recognises"):
        ess_init(torch.nn.Linear(3, 3), verbose=False)
    with pytest.raises(ValueError, match="probe"):
        ess_init(torch.nn.Sequential(SelectiveSSM(8)), verbose=False)


def test_custom_probe_candidates_and_verbose(capsys):
    model = SequenceModel("gla", d_model=32, n_layers=1, vocab_size=64)
    probe = torch.randint(0, 64, (2, 40))
    report = ess_init(model, probe=probe, candidates={"gla": [("slow", lambda m, g: gla_gate_(m, 64, 4))]})
    assert report.layers[0].scheme in ("slow", "unchanged")
    assert "blocks.0.mixer" in capsys.readouterr().out


def test_init_weights_ess_with_timm_named_apply():
    model = SequenceModel(["s6", "gla"], d_model=16, n_layers=2, vocab_size=32)
    with torch.no_grad():
        model.mixers[0].A_log.zero_()
        model.mixers[1].gate_logit_normalizer = 1.0
    named_apply(init_weights_ess, model)
    np.testing.assert_allclose(model.mixers[0].A_log[0].detach().exp().numpy(), np.arange(1, 17), rtol=1e-6)
    assert model.mixers[1].gate_logit_normalizer == 16.0


def test_default_model_is_initialized_quickly():
    import time

    model = SequenceModel("gla", d_model=64, n_layers=2, vocab_size=256)
    start = time.perf_counter()
    ess_init(model, verbose=False)
    assert time.perf_counter() - start < 10


def test_gla_s6_normalizer_sets_its_memory_and_auto_repairs_a_collapsed_gate():
    torch.manual_seed(0)
    collapsed = SequenceModel("gla_s6", d_model=32, n_layers=1, vocab_size=64,
                              gate_logit_normalizer=1.0, d_state=16)
    mixer = collapsed.blocks[0].mixer
    report = ess_init(collapsed, seed=0, verbose=False)
    entry = report["blocks.0.mixer"]
    assert "normalizer=1 " not in entry.scheme
    assert mixer.gate_logit_normalizer > 1 and entry.after > 1.5 * entry.before
    ess_init(collapsed, scheme="gla_s6", verbose=False)
    assert mixer.gate_logit_normalizer == 16 and (mixer.gate[1].bias == 0).all()
    torch.testing.assert_close(mixer.A_log.exp()[0], torch.arange(1.0, 17.0))


def test_la_feature_map_scheme_and_auto_choice():
    from init_schemes import la_feature_map_

    la = LinearAttention(32, feature_map="elu")
    la_feature_map_(la, "squared_relu", temperature=2.0)
    assert type(la.feature_map).__name__ == "SquaredReLU" and la.temperature == 2.0
    x = torch.randn(2, 12, 32)
    trace = la.trace(x)
    torch.testing.assert_close(trace.operator.dense() @ trace.u, trace.y, rtol=1e-4, atol=1e-5)
    normalized = LinearAttention(32, feature_map="elu", normalize=True)
    with pytest.raises(ValueError, match="normalize=True"):
        la_feature_map_(normalized, "identity")
    with pytest.raises(ValueError, match="temperature"):
        la_feature_map_(la, temperature=0.0)
    torch.manual_seed(0)
    model = SequenceModel("la", d_model=32, n_layers=1, vocab_size=64)
    report = ess_init(model, seed=0, verbose=False)
    labels = [label for label, _ in report["blocks.0.mixer"].evaluated]
    assert {"la elu temperature=1", "la relu temperature=2", "la identity temperature=4"} <= set(labels)
    chosen = report["blocks.0.mixer"].scheme
    assert chosen == "unchanged" or chosen.split()[1] in {"elu", "relu", "squared_relu", "identity"}
    # a map with its own parameters is never swapped by auto: only its temperature is searched
    hedgehog = SequenceModel("la", d_model=32, n_layers=1, vocab_size=64, feature_map="hedgehog")
    names = {n for n, _ in hedgehog.named_parameters()}
    report = ess_init(hedgehog, seed=0, verbose=False)
    assert {n for n, _ in hedgehog.named_parameters()} == names
    assert all("feature map unchanged" in label for label, _ in report["blocks.0.mixer"].evaluated)


def _dt_biases_after_init_weights_ess(seed: int) -> list[torch.Tensor]:
    model = SequenceModel(["s6", "s6"], d_model=16, n_layers=2, vocab_size=32)
    torch.manual_seed(seed)
    named_apply(init_weights_ess, model)
    return [m.dt_proj.bias.detach().clone() for m in model.mixers]


def test_init_weights_ess_draws_per_module_and_follows_the_global_seed():
    first, second = _dt_biases_after_init_weights_ess(0)
    assert not torch.equal(first, second)  # each layer gets its own draws
    again = _dt_biases_after_init_weights_ess(0)
    assert all(torch.equal(a, b) for a, b in zip((first, second), again, strict=True))
    other = _dt_biases_after_init_weights_ess(1)
    assert not torch.equal(first, other[0])


@pytest.mark.parametrize("mixer", ["gla", "gla_s6", "la"])
def test_chosen_settings_travel_with_the_state_dict(mixer, tmp_path):
    """A reloaded model computes what the initialized one computed (normalizer, temperature, map)."""
    torch.manual_seed(0)
    model = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32)
    layer = model.blocks[0].mixer
    if mixer == "la":
        layer.temperature = 2.5
        layer.set_feature_map("squared_relu")
    else:
        layer.gate_logit_normalizer = 64.0
    torch.save(model.state_dict(), tmp_path / "m.pt")
    fresh = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32)
    fresh.load_state_dict(torch.load(tmp_path / "m.pt", weights_only=True))
    again = fresh.blocks[0].mixer
    if mixer == "la":
        assert again.temperature == 2.5 and again.feature_map_name == "squared_relu"
        assert type(again.feature_map).__name__ == "SquaredReLU"
    else:
        assert again.gate_logit_normalizer == 64.0
    tokens = torch.randint(0, 32, (2, 12))
    torch.testing.assert_close(fresh(tokens), model(tokens), rtol=0, atol=0)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        setattr(again, "temperature" if mixer == "la" else "gate_logit_normalizer", 0.0)
    # a state dict saved before the settings were (no such keys) loads strictly: constructor values
    old = {k: v for k, v in model.state_dict().items()
           if not k.endswith(("gate_logit_normalizer", "temperature", "feature_map_code"))}
    plain = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32)
    plain.load_state_dict(old)
    assert (plain.blocks[0].mixer.temperature if mixer == "la"
            else plain.blocks[0].mixer.gate_logit_normalizer) in (1.0, 16.0)


@pytest.mark.parametrize("mixer", ["gla", "la"])
def test_settings_survive_meta_construction(mixer):
    """FSDP-style: build on the meta device, to_empty(), then load a state dict."""
    torch.manual_seed(0)
    source = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32)
    layer = source.blocks[0].mixer
    if mixer == "la":
        layer.temperature = 3.0
        layer.set_feature_map("relu")
    else:
        layer.gate_logit_normalizer = 4.0
    with torch.device("meta"):
        empty = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32)
    assert empty.blocks[0].mixer.__dict__["_saved_settings"]  # readable without touching meta memory
    empty.to_empty(device="cpu")
    empty.load_state_dict(source.state_dict())
    tokens = torch.randint(0, 32, (2, 10))
    torch.testing.assert_close(empty(tokens), source(tokens), rtol=0, atol=0)
    meta = SequenceModel(mixer, d_model=16, n_layers=1, vocab_size=32).to("meta")
    meta.load_state_dict(source.state_dict(), assign=True)
    assert (meta.blocks[0].mixer.temperature if mixer == "la"
            else meta.blocks[0].mixer.gate_logit_normalizer) in (3.0, 4.0)


def test_ess_init_auto_choice_survives_load_run(tmp_path):
    """``ess-reg train --init auto`` then ``load_run`` rebuilds the model that was trained."""
    from ess_reg.training import TrainConfig, load_run, make_model

    config = TrainConfig(mixer="gla", steps=0, out=str(tmp_path))
    model = make_model(config)
    report = ess_init(model, verbose=False)
    chosen = [m.gate_logit_normalizer for m in model.modules() if hasattr(m, "gate_logit_normalizer")]
    torch.save({"model": model.state_dict(), "train_config": dataclasses.asdict(config)},
               tmp_path / "checkpoint.pt")
    loaded, _ = load_run(tmp_path)
    again = [m.gate_logit_normalizer for m in loaded.modules() if hasattr(m, "gate_logit_normalizer")]
    assert again == chosen and any(c != 16.0 for c in chosen) and report.layers


def _third_party_model(kind: str) -> torch.nn.Module:
    if kind == "hf_mamba":
        from transformers import MambaConfig, MambaForCausalLM

        return MambaForCausalLM(MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1,
                                            vocab_size=32, expand=2))
    if kind == "hf_mamba2":
        from transformers import Mamba2Config, Mamba2ForCausalLM

        return Mamba2ForCausalLM(Mamba2Config(hidden_size=16, num_heads=4, head_dim=8, state_size=4,
                                              n_groups=1, num_hidden_layers=1, vocab_size=32,
                                              chunk_size=16))
    if kind == "mambapy":
        from mambapy.mamba import MambaBlock, MambaConfig

        class Wrapped(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.embed = torch.nn.Embedding(32, 16)
                self.block = MambaBlock(MambaConfig(d_model=16, n_layers=1, d_state=4, pscan=True))

            def forward(self, ids):
                return self.block(self.embed(ids))

        return Wrapped()
    from s5 import S5

    class WrappedS5(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(32, 4)
            self.s5 = S5(width=4, state_width=8)

        def forward(self, ids):
            return self.s5(self.embed(ids))

    return WrappedS5()


_OWNED_THIRD_PARTY = {"hf_mamba": ("A_log", "dt_proj.bias"), "hf_mamba2": ("A_log", "dt_bias"),
                      "mambapy": ("A_log", "dt_proj.bias"), "s5": ("seq.Lambda", "seq.log_step")}


@pytest.mark.parametrize("kind", sorted(_OWNED_THIRD_PARTY))
def test_ess_init_covers_third_party_layers(kind):
    pytest.importorskip({"hf_mamba": "transformers", "hf_mamba2": "transformers"}.get(kind, kind))
    torch.manual_seed(0)
    model = _third_party_model(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    probe = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    report = ess_init(model, probe=probe, verbose=False)
    assert report.layers and all(e.scheme != "unchanged (no schemes)" for e in report.layers)
    assert all(len(e.evaluated) >= 6 for e in report.layers)
    for name, value in model.named_parameters():
        if not name.endswith(_OWNED_THIRD_PARTY[kind]):
            assert torch.equal(value, before[name]), name
    named = ess_init(model, probe=probe, scheme="mamba" if "mamba" in kind else "s4d_lin", verbose=False)
    assert all(not e.scheme.startswith("unchanged") for e in named.layers)
    default = ess_init(model, probe=probe, scheme="default", verbose=False)
    assert all(not e.scheme.startswith("unchanged") for e in default.layers)
    twin = _third_party_model(kind)
    named_apply(init_weights_ess, twin)  # the reference scheme reaches third-party layers too
    changed = [n for n, p in twin.named_parameters() if n.endswith(_OWNED_THIRD_PARTY[kind])]
    assert changed


def test_s5_report_keeps_the_state_size_override():
    pytest.importorskip("s5")
    from ess_reg import capture_operators, utilization

    torch.manual_seed(0)
    model = _third_party_model("s5")
    probe = torch.randint(0, 32, (8, 64), generator=torch.Generator().manual_seed(0))
    report = ess_init(model, probe=probe, scheme="s4d_legs", verbose=False)
    with torch.no_grad():
        op = capture_operators(model, probe)["s5"]
    expected = float(utilization(op, splits=8).mean())
    assert report["s5"].after == pytest.approx(expected, rel=0.2)
