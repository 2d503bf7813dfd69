"""FSDP2 (``fully_shard``) with the regularizer on CPU (gloo, 2 processes): the same training as DDP.

The test launches this file under ``torch.distributed.run --standalone`` (which picks a free port)
with a timeout. Every rank trains the float64 GLA model for 3 SGD steps on its own batch, once per
configuration in ``RUNS``, and writes the full (gathered) parameters. fully_shard unshards the
parameters before each block's forward, so the mixers build their operators from plain tensors and
the penalty's gradient (loss term or injected in backward) reaches the parameters before FSDP
reduce-scatters them: FSDP2 equals DDP, in both modes, with the regularizer hooked before or after
``fully_shard``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

VOCAB, STEPS, WEIGHT = 40, 3, 0.5
#: name -> (wrapper, mode, penalty weight, regularizer built before or after wrapping)
RUNS = {
    "ddp_attached": ("ddp", "attached", WEIGHT, "before"),
    "ddp_loss": ("ddp", "loss", WEIGHT, "before"),
    "fsdp_attached": ("fsdp", "attached", WEIGHT, "before"),
    "fsdp_loss": ("fsdp", "loss", WEIGHT, "before"),
    "fsdp_attached_hooked_after": ("fsdp", "attached", WEIGHT, "after"),
    "fsdp_unregularized": ("fsdp", "attached", 0.0, "before"),
}


def _train(wrapper: str, mode: str, weight: float, order: str, rank: int) -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    from ess_reg import ESSOptimizer, ESSRegularizer
    from ess_reg.models import SequenceModel

    torch.manual_seed(0)  # the same initial parameters on every rank and in every run
    model = SequenceModel("gla", d_model=32, n_layers=2, vocab_size=VOCAB).double()

    def regularizer() -> ESSRegularizer:
        return ESSRegularizer(model, weight=weight, splits=[3, 7, 11])

    reg = regularizer() if order == "before" else None
    if wrapper == "fsdp":
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        run = fully_shard(model, mesh=mesh)
    else:
        run = DistributedDataParallel(model)
    reg = reg or regularizer()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "attached":
        opt = ESSOptimizer(opt, reg)
    generator = torch.Generator().manual_seed(10 + rank)  # each rank its own batch
    for _ in range(STEPS):
        ids = torch.randint(0, VOCAB, (2, 16), generator=generator)
        loss = run(ids).square().mean()
        if mode == "loss":
            loss = loss + reg()
        loss.backward()
        opt.step()
        opt.zero_grad()
    sharded = all(isinstance(p, DTensor) for p in model.parameters())
    params = {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for name, p in model.named_parameters()}
    return {"params": params, "sharded": sharded, "step_count": reg.step_count,
            "layers": sorted(reg.values)}


def _worker(out: Path) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {name: _train(*config, rank=rank) for name, config in RUNS.items()}
    torch.save(results, out / f"rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # measured: about 1 run in 7 of a 2-rank fully_shard job on CPU (with or without ess-reg) dies
    # at interpreter exit, after destroy_process_group, with "terminate called without an active
    # exception" (SIGABRT in gloo/c10d teardown); the results are saved, so skip finalization
    os._exit(0)


@pytest.mark.slow
def test_fsdp2_equals_ddp_with_the_regularizer(tmp_path):
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for results in ranks:
        for name, (wrapper, _, weight, _) in RUNS.items():
            result = results[name]
            assert result["sharded"] == (wrapper == "fsdp"), name
            assert result["step_count"] == STEPS, name
            assert result["layers"] == ([] if weight == 0 else ["blocks.0.mixer", "blocks.1.mixer"]), name
    reference = ranks[0]["ddp_attached"]["params"]
    for rank, results in enumerate(ranks):
        for name in RUNS:
            if name == "fsdp_unregularized":
                continue
            params = results[name]["params"]
            assert params.keys() == reference.keys()
            for key, value in reference.items():
                # float64; measured: bitwise equal (2 ranks: the reductions add two numbers)
                torch.testing.assert_close(params[key], value, rtol=1e-12, atol=1e-14,
                                           msg=lambda m, n=name, k=key, r=rank: f"{n} {k} rank {r}: {m}")
    # the penalty matters: without it the parameters end elsewhere (measured max |diff| 0.16)
    unregularized = ranks[0]["fsdp_unregularized"]["params"]
    gap = max(float((unregularized[k] - v).abs().max()) for k, v in reference.items())
    assert gap > 1e-3


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
