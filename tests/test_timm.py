"""timm models (timm.layers.BatchNormAct2d fuses the activation into the batch norm):
syncbn.torch.convert_sync_batchnorm converts them, keeping activation, drop and
parameters, a converted model trains equal to timm's on the concatenated batch, and
revert_sync_batchnorm brings timm's classes back."""

from __future__ import annotations

import sys

import pytest
import torch

import syncbn.torch as sbt

from conftest import WORKERS, run_mpi

timm = pytest.importorskip("timm")  # the test extra installs it; skip only when run bare
sys.path.insert(0, str(WORKERS))
from timm_train import LR, MODELS, SIZES, STEPS, batch, make  # noqa: E402

BatchNormAct2d = timm.layers.BatchNormAct2d


def test_batchnormact_converts_keeping_activation_drop_and_parameters_and_reverts():
    m = BatchNormAct2d(6, act_layer=torch.nn.SiLU, drop_layer=torch.nn.Dropout)
    m.eval()
    s = sbt.convert_sync_batchnorm(m)
    assert isinstance(s, sbt.SyncBatchNormAct) and isinstance(s, torch.nn.SyncBatchNorm)
    assert s.act is m.act and s.drop is m.drop and s.weight is m.weight
    x = torch.randn(3, 6, 4, 4)
    torch.testing.assert_close(s(x), m(x))  # eval: the same module, activation included
    back = sbt.revert_sync_batchnorm(s)
    assert type(back) is BatchNormAct2d and back.act is m.act and back.drop is m.drop
    torch.testing.assert_close(back(x), m(x))
    # timm's own synchronized class converts too, and reverts to the plain one.
    t = timm.layers.norm_act.convert_sync_batchnorm(BatchNormAct2d(6))
    assert type(t) is timm.layers.norm_act.SyncBatchNormAct
    s2 = sbt.convert_sync_batchnorm(t)
    assert isinstance(s2, sbt.SyncBatchNormAct) and type(sbt.revert_sync_batchnorm(s2)) in (
        BatchNormAct2d,)


def test_a_whole_timm_model_converts_with_no_warning_and_reverts(recwarn):
    net = make("efficientnet_b0")
    kinds = [type(m) for m in net.modules()]
    s = sbt.convert_sync_batchnorm(net)
    assert not [w for w in recwarn if "unconverted" in str(w.message)]
    assert BatchNormAct2d not in {type(m) for m in s.modules()}
    assert [type(m) for m in sbt.revert_sync_batchnorm(s).modules()] == kinds


def test_timm_models_train_equal_to_the_reference_across_ranks(tmp_path):
    n = 2
    run_mpi(n, WORKERS / "timm_train.py", tmp_path, timeout=300)
    sizes = (SIZES * n)[:n]
    for name in MODELS:
        ref = make(name)
        opt = torch.optim.SGD(ref.parameters(), lr=LR)
        for step in range(STEPS):
            x, w = batch(step, sum(sizes))
            opt.zero_grad()
            (ref(x) * w).sum().backward()
            opt.step()
        for r in range(n):
            got = torch.load(tmp_path / f"rank{r}.pt")[name]
            for k, t in ref.state_dict().items():
                # float64; a deep net amplifies rounding differences a little in 2 steps.
                torch.testing.assert_close(got[k].double(), t.double(), rtol=1e-6, atol=1e-7,
                                           msg=lambda m, k=k, r=r, name=name:
                                           f"{name} rank {r} {k}: {m}")
