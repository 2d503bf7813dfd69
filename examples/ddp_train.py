"""Train the default MQAR model with the ESS regularizer and metric under DDP (gloo, CPU).

    torchrun --standalone --nproc_per_node=2 examples/ddp_train.py --steps 20 --out runs/ddp

Each rank takes its share of every global batch; ``DistributedDataParallel`` averages the
gradients, including the regularizer's (each rank penalizes the operators of its own shard, and
every rank draws the same splits). At the end ``ESSMetric`` is computed on a fixed evaluation batch,
split across ranks and synced, and rank 0 writes ``metrics.json`` and ``model.pt``; every rank writes
a checksum of its parameters.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from ess_reg import ESSMetric, ESSRegularizer, capture_operators
from ess_reg.models import SequenceModel
from ess_reg.tasks import MQAR, loss_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--kv-pairs", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--reg-weight", type=float, default=1e-2)
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"))
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.global_batch % world:
        raise SystemExit(f"--global-batch {args.global_batch} must be divisible by {world} ranks")
    torch.manual_seed(0)  # identical initial parameters on every rank
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    model = SequenceModel("gla", d_model=args.d_model, n_layers=2, vocab_size=256)
    ddp = DistributedDataParallel(model)
    reg = ESSRegularizer(model, weight=args.reg_weight, splits=8)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    data = MQAR(args.steps * args.global_batch, args.seq_len, args.kv_pairs, 256, seed=1)
    for step in range(args.steps):
        rows = slice(step * args.global_batch + rank, (step + 1) * args.global_batch, world)
        loss = loss_fn(ddp(data.inputs[rows]), data.targets[rows]) + reg()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    reg.remove()

    evaluation = MQAR(2 * world * 4, args.seq_len, args.kv_pairs, 256, seed=2).inputs
    metric = ESSMetric(splits=16)
    model.eval()
    with torch.no_grad():
        metric.update(capture_operators(model, evaluation[rank::world]))
    result = {k: float(v) for k, v in metric.compute().items()}
    args.out.mkdir(parents=True, exist_ok=True)
    checksum = float(sum(p.double().sum() for p in model.parameters()))
    (args.out / f"checksum_rank{rank}.json").write_text(json.dumps(checksum))
    if rank == 0:
        (args.out / "metrics.json").write_text(json.dumps(result, indent=1))
        torch.save({"model": model.state_dict(), "config": model.config,
                    "evaluation": evaluation}, args.out / "model.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
