"""Extractors for real third-party layers: rebuild each layer's output from the captured operator."""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from torch import nn

from ess_reg import (
    DenseOperator,
    DiagonalRealization,
    ESSMetric,
    ESSRegularizer,
    capture_operators,
    ess_curve,
)
from integrations.third_party import register_available

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class _CausalMHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)

    def forward(self, x):
        length = x.shape[1]
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        return self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]


def test_torch_multihead_attention_rebuilds_its_output():
    torch.manual_seed(0)
    model = _CausalMHA().double().eval()
    x = torch.randn(2, 15, 32, dtype=torch.float64)
    op = capture_operators(model, x)["attn"]
    assert isinstance(op, DenseOperator) and op.shape == (2, 4)
    attn = model.attn
    v = x @ attn.in_proj_weight[64:].T + attn.in_proj_bias[64:]
    heads = v.view(2, 15, 4, 8).transpose(1, 2)
    mixed = (op.dense() @ heads).transpose(1, 2).reshape(2, 15, 32)
    torch.testing.assert_close(attn.out_proj(mixed), model(x), rtol=1e-10, atol=1e-10)


def test_bidirectional_multihead_attention_is_rejected_clearly():
    attn = nn.MultiheadAttention(16, 2, batch_first=True)
    x = torch.randn(1, 6, 16)
    with pytest.warns(UserWarning, match="leaves out layer 'attn'"), \
            pytest.raises(ValueError, match="'attn' .*without attn_mask.*square_subsequent_mask"):
        capture_operators(_Call(attn), x)


class _Call(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, x, x)[0]


def test_timm_attention_when_causal():
    from timm.layers import Attention

    torch.manual_seed(1)
    attn = Attention(32, num_heads=4, qkv_bias=True).double().eval()
    attn.fused_attn = False
    x = torch.randn(2, 12, 32, dtype=torch.float64)

    class Causal(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, is_causal=True)

    model = Causal()
    op = capture_operators(model, x)["attn"]
    qkv = attn.qkv(x).reshape(2, 12, 3, 4, 8).permute(2, 0, 3, 1, 4)
    mixed = (op.dense() @ qkv[2]).transpose(1, 2).reshape(2, 12, 32)
    torch.testing.assert_close(attn.proj(mixed), model(x), rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="non-causal.*'' .*is_causal=True"):
        capture_operators(attn, x)  # a bidirectional call is never measured
    attn.ess_causal = True  # a declaration for construction time; the call itself still decides
    with pytest.warns(UserWarning, match="leaves out layer ''"), \
            pytest.raises(ValueError, match="non-causal"):
        capture_operators(attn, x)


def _tiny_vit():
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16,
                             num_classes=4, depth=2)


def test_timm_vit_is_bidirectional_and_refused_at_construction():
    from ess_reg import ESSRegularizer
    from init_schemes import ess_init

    model = _tiny_vit()
    images = torch.randn(2, 3, 32, 32)
    with pytest.raises(ValueError, match="every recognised module of VisionTransformer is bidirectional"):
        ESSRegularizer(model)
    with pytest.raises(ValueError, match="bidirectional"):
        ess_init(model, probe=images, verbose=False)
    with pytest.warns(UserWarning, match=r"leaves out layer 'blocks\.0\.attn'"), \
            pytest.raises(ValueError, match="non-causal"):
        capture_operators(model, images)
    model(images)  # no hook is left behind to break a plain forward


def test_bidirectional_layers_are_left_out_with_one_warning():
    from timm.layers import Attention

    from ess_reg import ESSRegularizer
    from ess_reg.mixers import GatedLinearAttention

    class Hybrid(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = Attention(16, num_heads=2)
            self.text = GatedLinearAttention(16, num_heads=2)

        def forward(self, x):
            return self.text(x) + self.vision(x)

    torch.manual_seed(0)
    model = Hybrid()
    with pytest.warns(UserWarning, match=r"leaves out 1 bidirectional layer\(s\).*'vision'"):
        reg = ESSRegularizer(model, splits=3)
    assert list(reg.modules) == ["text"]
    model(torch.randn(2, 8, 16)).sum().backward()
    assert torch.isfinite(reg())


def _hf_mamba():
    from transformers import MambaConfig, MambaModel

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=50, expand=2)
    return MambaModel(config).double().eval()


def test_transformers_mamba_rebuilds_the_input_of_out_proj():
    from integrations.third_party.hf_transformers import mamba_inner_input

    warnings.filterwarnings("ignore")
    model = _hf_mamba()
    ids = torch.randint(0, 50, (2, 21), generator=torch.Generator().manual_seed(2))
    keep = {}
    mixer = model.layers[1].mixer
    mixer.out_proj.register_forward_pre_hook(lambda m, a: keep.__setitem__("y", a[0]))
    mixer.register_forward_pre_hook(
        lambda m, a, k: keep.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True)
    operators = capture_operators(model, ids)
    assert list(operators) == ["layers.0.mixer", "layers.1.mixer"]
    op = operators["layers.1.mixer"]
    assert isinstance(op, DiagonalRealization) and op.state_size == 8 and op.shape == (2, 64)
    u = mamba_inner_input(mixer, keep["x"])
    y = (op.dense() @ u)[..., 0] + mixer.D[None, :, None] * u[..., 0]
    gate = mixer.in_proj(keep["x"]).transpose(1, 2).chunk(2, dim=1)[1]
    y = y * torch.nn.functional.silu(gate)
    torch.testing.assert_close(y.transpose(1, 2), keep["y"], rtol=1e-6, atol=1e-7)


def test_transformers_eager_attention_and_regularizer_metric():
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, vocab_size=50, intermediate_size=64)
    model = LlamaModel(config).eval()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 50, (2, 16))
    operators = capture_operators(model, ids)
    reference = model(ids, output_attentions=True).attentions
    for k, name in enumerate(["layers.0.self_attn", "layers.1.self_attn"]):
        torch.testing.assert_close(operators[name].dense(), reference[k])
    metric = ESSMetric()
    metric.update(operators)
    assert "layers.0.self_attn/ess" in metric.compute()
    reg = ESSRegularizer(model, splits=4)
    model.train()
    model(ids).last_hidden_state.sum().mul(0).add(reg()).backward()
    assert model.layers[0].self_attn.q_proj.weight.grad is not None


def test_sdpa_attention_gives_a_clear_error():
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=50, intermediate_size=64)
    model = LlamaModel(config).eval()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        capture_operators(model, torch.randint(0, 50, (1, 8)))


def test_register_available_is_idempotent():
    register_available(only_imported=False)
    assert register_available(only_imported=False) == []


def test_transformers_mamba2_rebuilds_the_input_of_the_gated_norm():
    from transformers import Mamba2Config, Mamba2Model

    from integrations.third_party.hf_transformers import mamba2_features

    torch.manual_seed(0)
    config = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2,
                          num_hidden_layers=1, vocab_size=50, expand=2, chunk_size=8)
    model = Mamba2Model(config).double().eval()
    mixer = model.layers[0].mixer
    keep = {}
    mixer.norm.register_forward_pre_hook(lambda m, a: keep.__setitem__("y", a[0]))
    mixer.register_forward_pre_hook(
        lambda m, a, k: keep.__setitem__("x", a[0] if a else k["hidden_states"]), with_kwargs=True)
    ids = torch.randint(0, 50, (2, 19), generator=torch.Generator().manual_seed(1))
    op = capture_operators(model, ids)["layers.0.mixer"]
    assert op.shape == (2, 8) and op.state_size == 8 and op.log_decay.shape[-1] == 1
    u = mamba2_features(mixer, keep["x"])[0]
    y = op.dense() @ u + mixer.D[None, :, None, None] * u
    y = y.transpose(1, 2).reshape(2, 19, -1)
    torch.testing.assert_close(y, keep["y"].double(), rtol=1e-5, atol=1e-6)


def test_mambapy_block_rebuilds_the_input_of_out_proj():
    pytest.importorskip("mambapy")
    from mambapy.mamba import MambaBlock, MambaConfig

    from integrations.third_party.mambapy_blocks import mambapy_inner_input

    register_available(only_imported=False)
    torch.manual_seed(0)
    block = MambaBlock(MambaConfig(d_model=16, n_layers=1, d_state=8, pscan=True)).double().eval()
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    keep = {}
    block.out_proj.register_forward_pre_hook(lambda m, a: keep.__setitem__("y", a[0]))
    op = capture_operators(block, x)[""]
    u = mambapy_inner_input(block, x).transpose(1, 2)[..., None]  # [B, D, L, 1]
    y = (op.dense() @ u + block.D[None, :, None, None] * u)[..., 0].transpose(1, 2)
    z = block.in_proj(x).chunk(2, dim=-1)[1]
    torch.testing.assert_close(y * torch.nn.functional.silu(z), keep["y"], rtol=1e-6, atol=1e-6)


def test_s5_siso_pairs_rebuild_the_output():
    pytest.importorskip("s5")
    from s5 import S5

    register_available(only_imported=False)
    torch.manual_seed(0)
    layer = S5(width=4, state_width=8)
    x = torch.randn(2, 11, 4)
    op = capture_operators(layer, x)[""]
    assert op.shape == (16,) and op.state_size == 8  # 4 x 4 pairs, 8 modes closed under conjugation
    assert (ess_curve(op, "tolerance", tol=1e-6) <= 8).all()
    pairs = op.dense().double().view(4, 4, 11, 11)  # [h_out, h_in, L, L]
    y = torch.einsum("abij,njb->nia", pairs, x.double()) + layer.seq.D.double() * x.double()
    torch.testing.assert_close(y, layer(x).double(), rtol=1e-4, atol=1e-5)


def test_layers_non_causal_at_call_time_get_the_real_reason():
    from ess_reg import ESSRegularizer
    from init_schemes import ess_init

    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, dropout=0.0)
    model = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
    x = torch.randn(2, 6, 16)
    reg = ESSRegularizer(model)
    with pytest.warns(UserWarning, match="leaves out layer 'layers.0.self_attn'"):
        model(x)
    with pytest.raises(RuntimeError, match="non-causal operator.*'layers.0.self_attn'.*causal mask"):
        reg()
    reg.remove()
    with pytest.warns(UserWarning, match="leaves out layer"):
        report = ess_init(model, probe=x, verbose=False)
    assert report["layers.0.self_attn"].scheme == "unchanged (not causal on the probe)"


# -- check_capture: every built-in extractor reproduces what its layer computes ---------------------
def _gpt2(**overrides):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, **overrides)
    config._attn_implementation = "eager"
    return GPT2Model(config).double()


def _hf_eager(config_name: str, model_name: str, **kwargs):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, config_name)(vocab_size=50, num_hidden_layers=2, hidden_size=32,
                                                num_attention_heads=4, **kwargs)
    config._attn_implementation = "eager"
    return getattr(transformers, model_name)(config).double()


def _check_cases():
    from timm.layers import Attention
    from transformers import Mamba2Config, Mamba2Model

    from ess_reg.models import SequenceModel

    ids = torch.randint(0, 50, (2, 13), generator=torch.Generator().manual_seed(3))
    x = torch.randn(2, 13, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    cases = {f"mixer {name}": (SequenceModel(name, 32, 2, 50).double(), (ids,), 1e-12)
             for name in ("gla", "s6", "sa", "hyena", "s4d", "la", "wla", "gla_s6", "ssd")}
    cases["nn.MultiheadAttention"] = (_CausalMHA().double(), (x,), 1e-12)
    seq_first = _CausalMHA().double()
    seq_first.attn.batch_first = False
    cases["nn.MultiheadAttention seq-first"] = (_Call2(seq_first.attn), (x.transpose(0, 1),), 1e-12)
    attn = Attention(32, num_heads=4, qkv_bias=True).double()
    attn.ess_causal = True
    cases["timm Attention"] = (_Causal(attn), (x,), 1e-12)
    cases["HF Mamba"] = (_hf_mamba(), (ids,), 1e-8)  # transformers scans in float32
    mamba2 = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2,
                          num_hidden_layers=1, vocab_size=50, expand=2, chunk_size=8)
    cases["HF Mamba-2"] = (Mamba2Model(mamba2).double(), (ids,), 1e-6)
    cases["HF GPT-2 (eager)"] = (_gpt2(), (ids,), 1e-12)
    cases["HF Llama (eager)"] = (_hf_eager("LlamaConfig", "LlamaModel", num_key_value_heads=2,
                                           intermediate_size=64), (ids,), 1e-12)
    cases["HF OPT (eager)"] = (_hf_eager("OPTConfig", "OPTModel", ffn_dim=64, word_embed_proj_dim=32),
                               (ids,), 1e-12)
    cases["HF Phi-3 (eager)"] = (_hf_eager("Phi3Config", "Phi3Model", num_key_value_heads=2,
                                           intermediate_size=64, pad_token_id=0), (ids,), 1e-12)
    return cases


class _Call2(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        length = x.shape[0]
        mask = torch.ones(length, length, dtype=torch.bool).triu(1)
        return self.attn(x, x, x, attn_mask=mask)[0]


class _Causal(nn.Module):
    def __init__(self, attn):
        super().__init__()
        self.attn = attn

    def forward(self, x):
        return self.attn(x, is_causal=True)


def test_check_capture_verifies_every_builtin_extractor():
    from ess_reg import check_capture

    warnings.filterwarnings("ignore", message=".*falling back.*")
    for case, (model, inputs, tolerance) in _check_cases().items():
        model.train()  # check_capture runs in eval mode and restores the flags
        errors = check_capture(model, *inputs)
        assert errors, case
        assert all(0 <= e < tolerance for e in errors.values()), (case, errors)
        assert all(m.training for m in model.modules()), case


def test_check_capture_third_party_packages():
    pytest.importorskip("mambapy")
    pytest.importorskip("s5")
    from mambapy.mamba import MambaBlock, MambaConfig
    from s5 import S5

    from ess_reg import check_capture

    register_available(only_imported=False)
    torch.manual_seed(0)
    block = MambaBlock(MambaConfig(d_model=16, n_layers=1, d_state=8, pscan=True)).double()
    assert check_capture(block, torch.randn(2, 21, 16, dtype=torch.float64))[""] < 1e-12
    assert check_capture(S5(width=4, state_width=8), torch.randn(2, 11, 4))[""] < 1e-5  # complex64


def test_check_capture_catches_a_wrong_extractor_and_names_unverifiable_ones():
    from ess_reg import Capture, check_capture, register_extractor

    class Decay(nn.Module):  # y_t = sum_{j <= t} 0.5^(t - j) x_j per channel
        def forward(self, x):
            out, state = [], torch.zeros_like(x[:, 0])
            for t in range(x.shape[1]):
                state = 0.5 * state + x[:, t]
                out.append(state)
            return torch.stack(out, 1)

    def operator(decay):
        def extract(module, args, kwargs, output):
            x = args[0]
            batch, length, channels = x.shape
            log = torch.full((batch, channels, length, 1), math.log(decay), dtype=x.dtype)
            ones = torch.ones(batch, channels, length, 1, dtype=x.dtype)
            op = DiagonalRealization(ones, ones, log)
            return Capture(op, x.transpose(1, 2)[..., None], output,
                           lambda mixed: mixed[..., 0].transpose(1, 2))
        return extract

    x = torch.randn(2, 9, 3, dtype=torch.float64)
    register_extractor(Decay, operator(0.5))
    assert check_capture(Decay(), x)[""] < 1e-14
    register_extractor(Decay, operator(0.4))  # a wrong decay is caught
    assert check_capture(Decay(), x)[""] > 1e-2
    register_extractor(Decay, lambda m, a, k, out: operator(0.5)(m, a, k, out).operator)
    with pytest.warns(UserWarning, match=r"cannot verify ''.*ess_reg.Capture"):
        assert check_capture(Decay(), x) == {}


def test_gpt2_is_recognised_without_an_extractor_and_regularized():
    model = _gpt2().eval()  # attention dropout off: the weights the layer returns are T
    ids = torch.randint(0, 50, (2, 12))
    operators = capture_operators(model, ids)
    assert list(operators) == ["h.0.attn", "h.1.attn"] and operators["h.0.attn"].shape == (2, 4)
    reference = model(ids, output_attentions=True).attentions
    torch.testing.assert_close(operators["h.1.attn"].dense(), reference[1])
    reg = ESSRegularizer(model, splits=4)
    model(ids).last_hidden_state.sum().mul(0).add(reg()).backward()
    assert model.h[0].attn.c_attn.weight.grad is not None
    reg.remove()
    model.config._attn_implementation = "sdpa"
    with pytest.raises(ValueError, match="attn_implementation='eager'"):
        capture_operators(model, ids)


def test_hf_cross_attention_is_left_out_as_bidirectional():
    model = _gpt2(add_cross_attention=True)
    with pytest.warns(UserWarning, match=r"leaves out 2 bidirectional layer\(s\).*'h\.0\.crossattention'"):
        reg = ESSRegularizer(model, splits=3)
    assert sorted(reg.modules) == ["h.0.attn", "h.1.attn"]


def test_multihead_attention_calls_that_are_not_one_causal_sequence_are_left_out():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)

    class Hint(nn.Module):  # is_causal=True without a mask: torch's fast path may ignore the hint
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x):
            return self.attn(x, x, x, is_causal=True, attn_mask=None)[0] if not self.training else x

    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = mha

        def forward(self, x, memory):
            return self.attn(x, memory, memory)[0]

    x = torch.randn(2, 6, 8)
    # under no_grad: with gradients torch itself refuses the is_causal hint without a mask
    with pytest.warns(UserWarning, match="without attn_mask"), \
            pytest.raises(ValueError, match="non-causal"), torch.no_grad():
        capture_operators(Hint().eval(), x)
    with pytest.warns(UserWarning, match="cross-attention"), pytest.raises(ValueError, match="non-causal"):
        capture_operators(Cross(), x, torch.randn(2, 4, 8))
    unbatched = _Call2(nn.MultiheadAttention(8, 2, batch_first=True))  # [L, E] input, batch_first set
    assert capture_operators(unbatched, torch.randn(6, 8))["attn"].shape == (2,)


def test_attached_penalty_reaches_layers_that_return_tuples():
    from ess_reg import ESSOptimizer

    grads = {}
    for weight in (0.0, 10.0):
        model = _gpt2()
        reg = ESSRegularizer(model, weight=weight, splits=4) if weight else None
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        opt = ESSOptimizer(opt, reg) if reg is not None else opt
        torch.manual_seed(1)
        model(torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(5))
              ).last_hidden_state.pow(2).mean().backward()
        opt.step()
        grads[weight] = model.h[0].attn.c_attn.weight.grad.clone()
        if reg is not None:
            assert float(reg.last_penalty) != 0
    assert not torch.allclose(grads[0.0], grads[10.0])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batches_give_the_operator_the_layer_computes(side):
    """A padding mask reaches the extractors: Mamba-2 zeroes the padded positions' x, B and C, and a
    padded attention query (left padding: one that may attend to nothing) gets a zero row."""
    from transformers import Mamba2Config, Mamba2Model

    from ess_reg import check_capture

    warnings.filterwarnings("ignore", message=".*falling back.*")
    ids = torch.randint(1, 50, (2, 12), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 12, dtype=torch.long)
    padded = slice(0, 4) if side == "left" else slice(8, None)
    mask[0, padded] = 0
    mamba2 = Mamba2Config(hidden_size=32, num_heads=8, head_dim=8, state_size=8, n_groups=2,
                          num_hidden_layers=1, vocab_size=50, expand=2, chunk_size=8)
    models = {"HF Mamba": (_hf_mamba(), 1e-8), "HF Mamba-2": (Mamba2Model(mamba2).double(), 1e-6),
              "HF GPT-2 (eager)": (_gpt2().float(), 1e-5),
              "HF Llama (eager)": (_hf_eager("LlamaConfig", "LlamaModel", num_key_value_heads=2,
                                             intermediate_size=64).float(), 1e-5)}
    for case, (model, tolerance) in models.items():
        errors = check_capture(model, ids, attention_mask=mask)
        assert errors and all(e < tolerance for e in errors.values()), (case, side, errors)
        for name, op in capture_operators(model, ids, attention_mask=mask).items():
            if isinstance(op, DenseOperator):  # padded queries read nothing, real ones no padding
                T = op.dense()[0]
                assert (T[:, padded] == 0).all() and (T[:, :, padded] == 0).all(), (case, name)


def test_clip_text_tower_is_causal_and_its_vision_tower_is_left_out():
    """CLIP's attention class says is_causal=False for both towers; the text tower is called with a
    causal mask, so it is measured and regularized; the vision tower is left out at construction."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModel

    from ess_reg import check_capture

    torch.manual_seed(0)
    text = CLIPTextConfig(vocab_size=50, bos_token_id=0, eos_token_id=1, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16)
    text._attn_implementation = "eager"
    model = CLIPTextModel(text)
    ids = torch.randint(0, 50, (2, 10))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing is left out
        reg = ESSRegularizer(model, splits=4)
    assert len(reg.modules) == 2
    model(ids).last_hidden_state.sum().mul(0).add(reg()).backward()
    assert model.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert all(e < 1e-5 for e in check_capture(model, ids).values())
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=4, image_size=16, patch_size=8)
    vision._attn_implementation = "eager"
    with pytest.raises(ValueError, match="every recognised module.*bidirectional.*is_causal=False"):
        ESSRegularizer(CLIPVisionModel(vision))
