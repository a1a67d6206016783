"""Small nets and data shared by the torch training workers and the parent tests."""

import torch
from torch import nn

IN_SHAPE = {0: (6,), 1: (3, 8), 2: (3, 6, 6), 3: (3, 4, 4, 4)}


def make_net(dim, dtype=torch.float64, seed=0, **bn):
    """Two conv (or linear) + BatchNorm blocks of spatial dimension `dim` (0: (N, C))."""
    torch.manual_seed(seed)
    if dim == 0:
        layers = [nn.Linear(6, 5), nn.BatchNorm1d(5, **bn), nn.ReLU(), nn.Linear(5, 4),
                  nn.BatchNorm1d(4, **bn)]
    else:
        conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim]
        layers = [conv(3, 4, 3, padding=1), norm(4, **bn), nn.ReLU(),
                  conv(4, 5, 3, padding=1), norm(5, **bn)]
    return nn.Sequential(*layers).to(dtype)


def batch(step, total, dim, dtype=torch.float64):
    """The global batch of a step: input and the weights of a linear loss (sum over
    samples, so the global gradient is the sum of the ranks' gradients)."""
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn((total, *IN_SHAPE[dim]), generator=g, dtype=torch.float64) * 2 + 0.5
    out_c = 4 if dim == 0 else 5
    w = torch.randn((total, out_c, *IN_SHAPE[dim][1:]), generator=g, dtype=torch.float64)
    return x.to(dtype), w.to(dtype)


VARIANTS = {
    "2d-uneven": dict(dim=2, sizes=[3, 1, 2, 2]),
    "2d-empty-rank": dict(dim=2, sizes=[2, 0, 3, 1]),
    "2d-channels-last-float32": dict(dim=2, sizes=[2, 3, 1, 2], dtype="float32",
                                     channels_last=True),
    "1d-conv": dict(dim=1, sizes=[2, 3, 1, 2]),
    "1d-linear-NC": dict(dim=0, sizes=[3, 2, 2, 1]),
    "3d": dict(dim=3, sizes=[1, 2, 2, 1]),
    "momentum-none": dict(dim=2, sizes=[2, 1, 3, 2], bn=dict(momentum=None)),
    "affine-false": dict(dim=2, sizes=[1, 3, 2, 2], bn=dict(affine=False)),
    "no-running-stats": dict(dim=2, sizes=[2, 2, 1, 3], bn=dict(track_running_stats=False)),
}
STEPS = 3
LR = 0.1
