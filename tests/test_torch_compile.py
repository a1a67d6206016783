"""syncbn.torch under torch.compile in one process (DESIGN.md, "Compiled graphs"): the
layers trace into the graph with no break, the custom ops pass torch.library.opcheck, and
compiled training equals eager training. Inductor (the default backend) across ranks, with
an empty rank, is in tests/test_torch_features.py."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import syncbn.torch as sbt
from syncbn import _torch_ops as ops


class ResNetish(nn.Module):
    """A stem and a residual block whose shortcut has its own BatchNorm2d; one layer with
    momentum=None (cumulative average: no .item() in the graph)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c1, self.bn1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6, momentum=None)
        self.c2, self.bn2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.sc, self.bns = nn.Conv2d(6, 6, 1), nn.BatchNorm2d(6, affine=False)

    def forward(self, x):
        h = F.relu(self.bn0(self.stem(x)))
        return F.relu(self.bn2(self.c2(F.relu(self.bn1(self.c1(h))))) + self.bns(self.sc(h)))


def model():
    torch.manual_seed(0)
    return sbt.convert_sync_batchnorm(ResNetish().double())


@pytest.mark.parametrize("training", [True, False])
def test_no_graph_break_in_training_or_eval(training):
    net = model().train(training)
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ex = torch._dynamo.explain(net)(x)
    assert ex.graph_break_count == 0 and ex.graph_count == 1, ex.break_reasons
    if training:  # the layers are in the graph as syncbn's ops, not run eagerly
        ops_in_graph = [n.target for g in ex.graphs for n in g.graph.nodes
                        if n.op == "call_function"]
        bn = torch.ops.syncbn.batch_norm.default
        assert sum(t is bn for t in ops_in_graph) == 4, ops_in_graph


OPCHECK = {
    "train": dict(training=True),
    "eval": dict(training=False),
    "no-affine-no-stats": dict(training=True, affine=False, stats=False),
    "channels-last": dict(training=True, channels_last=True),
    "axis-last-biased": dict(training=True, axis=-1, unbiased=False),
}


@pytest.mark.parametrize("case", list(OPCHECK))
def test_custom_ops_pass_opcheck(case):
    c = OPCHECK[case]
    g = torch.Generator().manual_seed(3)
    shape = (4, 3, 5, 2) if c.get("axis", 1) == 1 else (4, 5, 2, 3)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if c.get("channels_last"):
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(c["training"])
    w = b = rm = rv = None
    if c.get("affine", True):
        w = (torch.rand(3, generator=g, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.rand(3, generator=g, dtype=torch.float64).requires_grad_()
    if c.get("stats", True):
        rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    args = (x, w, b, rm, rv, torch.tensor(0.1, dtype=torch.float64),
            torch.zeros((), dtype=torch.float64), c["training"], 1e-5, 0, 0, "", c.get("axis", 1),
            c.get("unbiased", True))
    torch.library.opcheck(ops.batch_norm, args)
    y, mean, invstd, count, *_ = ops.batch_norm(*args)
    dy = torch.randn_like(x)
    torch.library.opcheck(ops.batch_norm_backward, (
        dy, x.detach(), None if w is None else w.detach(), mean, invstd, count,
        torch.zeros((), dtype=torch.float64), c["training"], 0, 0, "", c.get("axis", 1), True,
        w is not None, b is not None))
    payload = torch.randn(6, generator=g, dtype=torch.float64)
    torch.library.opcheck(ops.allreduce, (payload, 4.0, 0, False, 1, 0, ""))


def test_compiled_training_equals_eager_aot_eager_channels_last():
    """fullgraph=True (a graph break would raise): parameters, gradients, running stats and
    num_batches_tracked after three SGD steps equal eager's; eval output too."""
    eager, compiled = model(), model()
    fn = torch.compile(compiled, fullgraph=True, backend="aot_eager")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1)
    opt_c = torch.optim.SGD(compiled.parameters(), lr=0.1)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        x = torch.randn(5, 3, 8, 8, generator=g, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last)
        w = torch.randn(5, 6, 8, 8, generator=g, dtype=torch.float64)
        for f, opt in ((eager, opt_e), (fn, opt_c)):
            opt.zero_grad()
            y = f(x)
            assert y.is_contiguous(memory_format=torch.channels_last)
            (y * w).sum().backward()
            opt.step()
        for (k, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters(),
                                  strict=True):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-10, msg=k)
    for (k, t), (_, u) in zip(eager.state_dict().items(), compiled.state_dict().items(),
                              strict=True):
        torch.testing.assert_close(u, t, rtol=1e-10, atol=1e-10, msg=k)
    assert int(compiled.bn1.num_batches_tracked) == 3
    eager.eval(), compiled.eval()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(fn(x), eager(x), rtol=1e-10, atol=1e-10)


def test_an_all_empty_compiled_step_counts_and_leaves_the_statistics():
    net = model()
    fn = torch.compile(copy.deepcopy(net).bn0, fullgraph=True, backend="aot_eager")
    bn = fn._orig_mod
    before = {k: t.clone() for k, t in bn.state_dict().items()}
    y = fn(torch.randn(0, 6, 4, 4, dtype=torch.float64))
    assert y.shape == (0, 6, 4, 4)
    # As torch's BatchNorm and SyncBatchNorm: the step counts, the statistics stay.
    assert int(bn.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    for k, t in bn.state_dict().items():
        assert k == "num_batches_tracked" or torch.equal(t, before[k]), k
