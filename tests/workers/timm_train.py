"""One rank of the timm training check (tests/test_timm.py).

Usage: mpiexec -n N python -m mpi4py timm_train.py OUT_DIR

timm models with random weights (no download), converted by
syncbn.torch.convert_sync_batchnorm (efficientnet_b0's BatchNormAct2d layers become
SyncBatchNormAct, keeping their activation and drop), trained a few SGD steps on this
rank's slice of a seeded global batch, gradients summed over ranks with mpi4py. Saves the
state dicts to OUT_DIR/rank{r}.pt for the parent to compare with the unconverted model
trained in one process on the concatenated batch.
"""

import os
import sys

import timm
import torch
from mpi4py import MPI

import syncbn.torch as sbt

MODELS = ("resnet18", "efficientnet_b0")
SIZES = [3, 2]
STEPS = 2
LR = 0.05


def make(name):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=3).double()


def batch(step, total):
    g = torch.Generator().manual_seed(50 + step)
    x = torch.randn(total, 3, 32, 32, generator=g, dtype=torch.float64)
    return x, torch.randn(total, 3, generator=g, dtype=torch.float64)


def main(out_dir):
    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    sizes = (SIZES * size)[:size]
    off, n = sum(sizes[:rank]), sizes[rank]
    res = {}
    for name in MODELS:
        net = sbt.convert_sync_batchnorm(make(name))
        kinds = {type(m).__name__ for m in net.modules()}
        assert "BatchNorm2d" not in kinds and "BatchNormAct2d" not in kinds, kinds
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        for step in range(STEPS):
            x, w = batch(step, sum(sizes))
            loss = (net(x[off:off + n]) * w[off:off + n]).sum()
            opt.zero_grad()
            loss.backward()
            for p in net.parameters():
                world.Allreduce(MPI.IN_PLACE, p.grad.numpy())
            opt.step()
        res[name] = {k: t.clone() for k, t in net.state_dict().items()}
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
