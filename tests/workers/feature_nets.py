"""Models and data of the torch adapter's multi-rank feature checks
(tests/workers/torch_features.py and the parent tests/test_torch_features.py)."""

import zlib

import torch
from torch import nn
from torch.nn import functional as F


class TwoBranchMLP(nn.Module):
    """A trunk, then two independent branches of unequal size with SyncBN layers: without
    an ordering token inductor (default options) schedules the branches' collectives in
    different orders on an empty rank and on the others (seen with torch 2.13: 103, 102,
    100, 101 on an empty rank against 100, 102, 101, 103)."""

    def __init__(self):
        super().__init__()
        self.l0, self.b0 = nn.Linear(6, 8), nn.BatchNorm1d(8)
        self.la, self.ba = nn.Linear(8, 64), nn.BatchNorm1d(64)
        self.la2, self.ba2 = nn.Linear(64, 4), nn.BatchNorm1d(4)
        self.lb, self.bb = nn.Linear(8, 4), nn.BatchNorm1d(4, momentum=None)

    def trunk(self, x):
        return F.relu(self.b0(self.l0(x)))

    def head(self, h):
        return self.ba2(self.la2(F.relu(self.ba(self.la(h))))) + self.bb(self.lb(h))

    def forward(self, x):
        return self.head(self.trunk(x))


class ResNet(nn.Module):
    """A stem and one residual block whose shortcut has its own BatchNorm2d."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.c2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.sc, self.bns = nn.Conv2d(6, 6, 1, bias=False), nn.BatchNorm2d(6)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        return F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))) + self.bns(self.sc(h)))


def make_mlp():
    torch.manual_seed(1)
    return TwoBranchMLP().double()


def make_resnet():
    torch.manual_seed(2)
    return ResNet().double().to(memory_format=torch.channels_last)


# Per-rank batch sizes (a pattern repeated/cut to the world size); 0: an empty rank.
SIZES = {"mlp": [3, 0, 4], "resnet": [2, 3, 1], "layer": [3, 0, 2]}
SHAPES = {"mlp": ((6,), (4,)), "resnet": ((3, 6, 6), (6, 6, 6)), "layer": ((5, 4), (5, 4))}
STEPS = 3
LR = 0.1


def batch(name, step, total):
    """The global batch of a step: input, and the weights of a linear loss (a sum over
    samples, so the global gradient is the sum of the ranks')."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{step}".encode()))
    xs, ws = SHAPES[name]
    x = torch.randn((total, *xs), generator=g, dtype=torch.float64) * 2 + 0.5
    return x, torch.randn((total, *ws), generator=g, dtype=torch.float64)
