"""Framework integrations, run against the real packages (tiny models, CPU, no downloads)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from ess_reg import ESSOptimizer, ESSRegularizer
from ess_reg.models import SequenceModel
from ess_reg.tasks import MQAR, loss_fn
from integrations._requires import require

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")


def test_missing_package_message():
    with pytest.raises(ImportError, match=r"pip install 'ess-reg\[extra\]'"):
        require("surely_not_a_package_xyz", "extra")


class _LitGLA:
    """A small Lightning module factory (Lightning is imported lazily)."""

    @staticmethod
    def make(with_callback_reg: bool):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                torch.manual_seed(0)
                self.model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=32)

            def forward(self, x):
                return self.model(x)

            def training_step(self, batch, batch_idx):
                x, y = batch
                loss = loss_fn(self(x), y)
                return loss + self.ess_reg() if with_callback_reg else loss

            def configure_optimizers(self):
                opt = torch.optim.AdamW(self.parameters(), lr=1e-3)
                if with_callback_reg:
                    return opt
                return ESSOptimizer(opt, ESSRegularizer(self.model, weight=0.1, splits=3))

        return Module()


def _lit_data(examples: int = 64):
    task = MQAR(examples, 16, 2, 32, seed=0)
    return DataLoader(TensorDataset(task.inputs, task.targets), batch_size=8)


def _csv_rows(folder) -> list[dict[str, str]]:
    import csv
    import glob

    (path,) = glob.glob(str(folder / "**" / "metrics.csv"), recursive=True)
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("owner", ["callback", "optimizer"])
def test_lightning_callback_logs_fresh_values_at_its_own_cadence(tmp_path, owner):
    """Trainer's default log_every_n_steps=50 does not hide the callback's values (every 2 steps)."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from integrations.lightning import ESSCallback

    reg = {"weight": 0.1, "splits": 3} if owner == "callback" else None
    callback = ESSCallback(log_every_n_steps=2, regularizer=reg)
    trainer = L.Trainer(max_steps=6, callbacks=[callback], logger=CSVLogger(str(tmp_path)),
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
    module = _LitGLA.make(owner == "callback")
    trainer.fit(module, _lit_data())
    key = "ess/model.blocks.0.mixer/ess"
    rows = [r for r in _csv_rows(tmp_path) if r.get(key)]
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    assert len({r[key] for r in rows}) == 3  # fresh values, not a stale one repeated
    assert all(r["ess/penalty"] and float(r["ess/penalty"]) > 0 for r in rows)
    assert "ess/total" in rows[0] and not any(k.startswith("ess/ess/") for k in rows[0])
    assert key in callback.last and key in trainer.callback_metrics
    assert not hasattr(module, "ess_reg") and callback.regularizer is None  # torn down
    assert not any(m._forward_hooks for m in module.model.modules()) or owner == "optimizer"


@pytest.mark.parametrize("owner", ["callback", "optimizer"])
def test_lightning_resume_from_ckpt_path_is_bit_identical(tmp_path, owner):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from integrations.lightning import ESSCallback

    def fit(max_steps, ckpt_path=None, save=False):
        reg = {"weight": 0.1, "splits": 3} if owner == "callback" else None
        callbacks = [ESSCallback(log_every_n_steps=100, regularizer=reg)]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=str(tmp_path), save_last=True))  # at epoch ends
        trainer = L.Trainer(max_steps=max_steps, callbacks=callbacks, logger=False,
                            enable_checkpointing=save, enable_progress_bar=False,
                            enable_model_summary=False, accelerator="cpu", default_root_dir=str(tmp_path))
        module = _LitGLA.make(owner == "callback")
        torch.manual_seed(1)
        trainer.fit(module, _lit_data(8), ckpt_path=ckpt_path)  # one step per epoch: resumable data
        return module

    straight = fit(6)
    fit(3, save=True)
    resumed = fit(6, ckpt_path=str(tmp_path / "last.ckpt"))
    for (name, p), q in zip(straight.named_parameters(), resumed.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_lightning_with_ess_optimizer(tmp_path):
    import lightning as L

    from ess_reg import ESSRegularizer

    task = MQAR(16, 16, 2, 32, seed=0)

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=32)

        def training_step(self, batch, batch_idx):
            return loss_fn(self.model(batch[0]), batch[1])

        def configure_optimizers(self):
            reg = ESSRegularizer(self.model, weight=0.1, splits=3)
            return ESSOptimizer(torch.optim.SGD(self.parameters(), lr=0.1), reg)

    module = Module()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                        default_root_dir=str(tmp_path))
    trainer.fit(module, DataLoader(TensorDataset(task.inputs, task.targets), batch_size=8))
    assert trainer.optimizers[0].regularizer.step_count == 3


def test_hf_trainer_with_mixin_and_callback(tmp_path):
    from transformers import MambaConfig, MambaForCausalLM, Trainer, TrainingArguments

    from integrations.hf import ESSTrainerCallback, ESSTrainerMixin

    torch.manual_seed(0)
    config = MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=2, vocab_size=64, expand=2)
    model = MambaForCausalLM(config)
    ids = torch.randint(0, 64, (16, 24), generator=torch.Generator().manual_seed(0))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    class ESSTrainer(ESSTrainerMixin, Trainer):
        pass

    callback = ESSTrainerCallback(probe=ids[:2], log_every_n_steps=2)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=4,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    trainer = ESSTrainer(model=model, args=args, train_dataset=Data(),
                         ess_regularizer={"weight": 0.1, "splits": 4}, callbacks=[callback])
    trainer.train()
    assert len(trainer.ess_penalties) == 4 and all(p > 0 for p in trainer.ess_penalties)
    history = trainer.state.log_history
    logged = [entry for entry in history if "ess/backbone.layers.0.mixer/ess" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]  # the callback's cadence
    assert "ess/total" in logged[0] and not any(k.startswith("ess/ess/") for k in logged[0])
    penalties = [entry["ess/penalty"] for entry in history if "loss" in entry]
    assert penalties == pytest.approx(trainer.ess_penalties)  # every training log, logging_steps=1


def test_timm_optimizer_and_named_apply_init():
    from integrations.timm import create_ess_optimizer, init_ess_

    model = SequenceModel(["s6", "gla"], d_model=16, n_layers=2, vocab_size=32)
    opt = create_ess_optimizer(model, {"weight": 0.1, "splits": 3}, opt="adamw", lr=1e-3,
                               weight_decay=0.05)
    assert isinstance(opt, ESSOptimizer)
    decays = sorted({g["weight_decay"] for g in opt.param_groups})
    assert decays == [0.0, 0.05]  # timm's groups: no decay on biases and norms
    loss_fn(model(torch.randint(0, 32, (2, 12))), torch.randint(0, 32, (2, 12))).backward()
    opt.step()
    with torch.no_grad():
        model.mixers[0].A_log.zero_()
    init_ess_(model)
    assert torch.allclose(model.mixers[0].A_log[0].exp(), torch.arange(1.0, 17.0))


@pytest.mark.parametrize("lookahead", [False, True])
def test_pytorch_optimizer_create_optimizer(lookahead):
    from pytorch_optimizer import Lookahead

    from integrations.pytorch_optimizer import create_optimizer, get_supported_optimizers

    model = SequenceModel("gla", d_model=16, n_layers=1, vocab_size=32)
    opt = create_optimizer(model, "adamp", lr=1e-3, use_lookahead=lookahead,
                           ess={"weight": 0.1, "splits": 3})
    assert isinstance(opt, ESSOptimizer)
    assert isinstance(opt.optimizer, Lookahead) == lookahead
    loss_fn(model(torch.randint(0, 32, (2, 12))), torch.randint(0, 32, (2, 12))).backward()
    opt.step()
    assert opt.regularizer.step_count == 1
    assert "adamp" in get_supported_optimizers("adam*")
    assert not isinstance(create_optimizer(model, "adamw"), ESSOptimizer)


def test_analyze_hf_local_config(tmp_path, capsys):
    from transformers import LlamaConfig, MambaConfig

    from ess_reg.cli import main

    LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                vocab_size=50, intermediate_size=64).save_pretrained(tmp_path / "llama")
    assert main(["analyze", "--hf", str(tmp_path / "llama"), "--examples", "2", "--seq-len", "12"]) == 0
    out = capsys.readouterr().out
    assert "layers.1.self_attn" in out and "random weights" in out
    assert "verdict" in out and "no kv count" in out and "Loading" not in out
    assert sorted(p.name for p in (tmp_path / "llama").iterdir()) == ["config.json"]  # nothing written there
    plot = tmp_path / "plots" / "llama.png"
    assert main(["analyze", "--hf", str(tmp_path / "llama"), "--examples", "2", "--seq-len", "12",
                 "--plot", str(plot)]) == 0
    assert plot.exists() and f"curve plot: {plot}" in capsys.readouterr().out
    MambaConfig(hidden_size=32, state_size=8, num_hidden_layers=1, vocab_size=50).save_pretrained(
        tmp_path / "mamba")
    assert main(["analyze", "--hf", str(tmp_path / "mamba" / "config.json"), "--ids", "1,2,3,4,5,6"]) == 0
    assert "layers.0.mixer" in capsys.readouterr().out
    assert main(["analyze", "--hf", str(tmp_path / "nothing")]) == 2
    assert main(["analyze", "--hf", str(tmp_path / "mamba"), "--ids", "1,x"]) == 2
    capsys.readouterr()
    assert main(["analyze", "--hf", str(tmp_path / "mamba"), "--ids", "1,2,50,3"]) == 2  # vocabulary 0 .. 49
    assert "outside the vocabulary 0 .. 49: [50]" in capsys.readouterr().err
    assert main(["analyze", "--hf", str(tmp_path / "mamba"), "--text", str(tmp_path / "t.txt")]) == 2


def test_hf_penalty_gradient_does_not_grow_with_gradient_accumulation(tmp_path):
    """Same 4 examples per optimizer step in 1 or 2 micro-batches: the same gradient (penalty
    included), and the schedule counts optimizer steps."""
    from transformers import MambaConfig, MambaForCausalLM, Trainer, TrainingArguments

    from integrations.hf import ESSTrainerMixin

    ids = torch.randint(0, 64, (4, 16), generator=torch.Generator().manual_seed(0))

    class Data(torch.utils.data.Dataset):
        def __len__(self):
            return len(ids)

        def __getitem__(self, i):
            return {"input_ids": ids[i], "labels": ids[i]}

    class Probe(ESSTrainerMixin, Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            out = super().training_step(model, inputs, num_items_in_batch)
            self.grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
            return out

    grads = {}
    for accumulation in (1, 2):
        torch.manual_seed(0)
        model = MambaForCausalLM(MambaConfig(hidden_size=16, state_size=4, num_hidden_layers=1,
                                             vocab_size=64, expand=2)).double()
        args = TrainingArguments(output_dir=str(tmp_path / str(accumulation)), max_steps=1,
                                 per_device_train_batch_size=4 // accumulation,
                                 gradient_accumulation_steps=accumulation, learning_rate=0.0,
                                 logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                                 disable_tqdm=True)
        trainer = Probe(model=model, args=args, train_dataset=Data(),
                        ess_regularizer={"weight": 10.0, "splits": [4, 8, 12]})
        trainer.train()
        assert trainer.ess_regularizer.step_count == 1  # one optimizer step
        assert len(trainer.ess_penalties) == accumulation
        grads[accumulation] = trainer.grads
    torch.testing.assert_close(grads[2], grads[1], rtol=1e-6, atol=1e-9)
