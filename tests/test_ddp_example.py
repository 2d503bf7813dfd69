"""examples/ddp_train.py under torchrun with 2 CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ess_reg import ESSMetric, capture_operators
from ess_reg.models import SequenceModel

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_two_ranks_train_identically_and_the_metric_matches(tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(ROOT / "examples" / "ddp_train.py"), "--steps", "6", "--global-batch", "8",
               "--seq-len", "32", "--kv-pairs", "2", "--d-model", "32", "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    checksums = [json.loads((out / f"checksum_rank{r}.json").read_text()) for r in range(2)]
    assert checksums[0] == checksums[1]
    synced = json.loads((out / "metrics.json").read_text())
    saved = torch.load(out / "model.pt", weights_only=False)
    model = SequenceModel(**saved["config"])
    model.load_state_dict(saved["model"])
    model.eval()
    single = ESSMetric(splits=16)
    with torch.no_grad():
        single.update(capture_operators(model, saved["evaluation"]))  # the same global batch
    expected = {k: float(v) for k, v in single.compute().items()}
    assert synced.keys() == expected.keys()
    for key, value in expected.items():
        assert synced[key] == pytest.approx(value, rel=1e-9), key
