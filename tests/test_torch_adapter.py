"""syncbn.torch: the drop-in SyncBatchNorm (DESIGN.md: equivalence, conventions, errors)."""

from __future__ import annotations

import copy
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import syncbn
import syncbn.torch as sbt

from conftest import WORKERS, run_mpi, run_torchrun

sys.path.insert(0, str(WORKERS))
from torch_nets import LR, STEPS, VARIANTS, batch, make_net  # noqa: E402


def reference_training(v):
    """torch.nn.BatchNorm*d net trained in one process on the concatenated batch."""
    dtype = getattr(torch, v.get("dtype", "float64"))
    net = make_net(v["dim"], dtype, **v.get("bn", {}))
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    for step in range(STEPS):
        total = sum(v["sizes_used"])
        x, w = batch(step, total, v["dim"], dtype)
        loss = (net(x) * w).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    xe, _ = batch(99, 4, v["dim"], dtype)
    with torch.no_grad():
        ye = net(xe)
    return net.state_dict(), ye


@pytest.mark.parametrize("nranks", [2, 3, 4])
@pytest.mark.parametrize("launcher", ["mpiexec", "torchrun-ddp-gloo"])
def test_training_equals_batchnorm_on_concatenated_batch(launcher, nranks, tmp_path):
    if launcher == "mpiexec":
        run_mpi(nranks, WORKERS / "torch_train.py", tmp_path, "mpi", timeout=300)
    else:
        run_torchrun(nranks, WORKERS / "torch_train.py", tmp_path, "ddp")
    check_training_results(tmp_path, nranks)
    # Eager CPU training ran the C++ autograd node wherever it was built for this torch.
    node = syncbn.build_info()["torch"] == torch.__version__
    assert all(torch.load(tmp_path / f"rank{r}.pt")["native"] == node for r in range(nranks))


def check_training_results(out_dir, nranks):
    """torch_train.py's results in out_dir against the one-process float64 references."""
    res = [torch.load(out_dir / f"rank{r}.pt") for r in range(nranks)]
    for name, v in VARIANTS.items():
        v = dict(v, sizes_used=(v["sizes"] * nranks)[:nranks])
        ref_state, ref_eval = reference_training(v)
        tol = 1e-4 if v.get("dtype") == "float32" else 1e-9
        for r in range(nranks):
            got = res[r][name]["state"]
            assert set(got) == set(ref_state), name
            for k, t in ref_state.items():
                torch.testing.assert_close(got[k].double(), t.double(), rtol=tol, atol=tol,
                                           msg=lambda m, k=k, n=name, r=r: f"{n} rank {r} {k}: {m}")
            torch.testing.assert_close(res[r][name]["eval_out"].double(), ref_eval.double(),
                                       rtol=tol, atol=tol)

    for dt, tol in (("bfloat16", 2 ** -7), ("float16", 2 ** -10)):
        sizes = res[0][dt]["sizes"]
        g = torch.Generator().manual_seed(7)
        X = (torch.randn((sum(sizes), 4, 50), generator=g) * 3 + 5).to(getattr(torch, dt))
        DY = torch.randn((sum(sizes), 4, 50), generator=g).to(getattr(torch, dt))
        w = torch.empty(4).uniform_(0.5, 1.5, generator=g).double().requires_grad_()
        b = torch.empty(4).uniform_(-0.5, 0.5, generator=g).double().requires_grad_()
        x = X.double().requires_grad_()
        rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
        y = F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)
        y.backward(DY.double())
        offs = np.cumsum([0] + sizes)
        for r in range(nranks):
            sl = slice(offs[r], offs[r + 1])
            out = res[r][dt]
            scale = 4 * tol * max(1.0, float(y.detach().abs().max()))
            torch.testing.assert_close(out["y"].double(), y[sl].detach(), atol=scale, rtol=0)
            torch.testing.assert_close(out["dx"].double(), x.grad[sl], atol=4 * tol, rtol=0)
            torch.testing.assert_close(out["running_mean"].double(), rm, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(out["running_var"].double(), rv, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(sum(res[r][dt]["dw"].double() for r in range(nranks)),
                                   w.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sum(res[r][dt]["db"].double() for r in range(nranks)),
                                   b.grad, rtol=1e-5, atol=1e-4)


# ---- single process -------------------------------------------------------------------

def test_is_a_batchnorm_module_with_the_same_parameters_and_buffers():
    bn = sbt.SyncBatchNorm(5)
    assert isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    assert [k for k, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [k for k, _ in bn.named_buffers()] == ["running_mean", "running_var",
                                                   "num_batches_tracked"]


@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm1d, (6, 5)),
                                       (torch.nn.BatchNorm1d, (6, 5, 7)),
                                       (torch.nn.BatchNorm2d, (6, 5, 3, 4)),
                                       (torch.nn.BatchNorm3d, (6, 5, 2, 3, 2))])
def test_state_dict_round_trips_with_torch_batchnorm(cls, shape):
    torch.manual_seed(0)
    ref = cls(5)
    ref(torch.randn(shape))  # non-trivial running stats and num_batches_tracked
    with torch.no_grad():
        ref.weight.uniform_()
        ref.bias.uniform_()
    ours = sbt.SyncBatchNorm(5)
    ours.load_state_dict(ref.state_dict())
    back = cls(5)
    back.load_state_dict(ours.state_dict())
    for k, t in ref.state_dict().items():
        assert torch.equal(back.state_dict()[k], t), k
    x = torch.randn(shape)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x))


def test_matches_torch_batchnorm_single_process_in_train_and_eval():
    torch.manual_seed(1)
    ref = torch.nn.BatchNorm2d(4).double()
    ours = sbt.SyncBatchNorm(4, dtype=torch.float64)
    for _ in range(3):
        x = torch.randn(5, 4, 3, 3, dtype=torch.float64) * 3 + 2
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], t, rtol=1e-12, atol=1e-12)
    ours.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_float64(affine):
    bn = sbt.SyncBatchNorm(3, affine=affine, track_running_stats=False, dtype=torch.float64)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    params = (bn.weight, bn.bias) if affine else ()

    def f(x, *p):
        return sbt._sync_batch_norm(x, *(p or (None, None)), None, None, True, 0.1, 1e-5,
                                    syncbn.comm.local())[0]

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("fmt,shape", [(torch.channels_last, (3, 4, 5, 6)),
                                       (torch.channels_last_3d, (3, 4, 2, 5, 6))])
def test_channels_last_input_keeps_its_memory_format(fmt, shape):
    bn = sbt.SyncBatchNorm(4)
    x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
    y = bn(x)
    assert y.is_contiguous(memory_format=fmt)
    y.backward(torch.randn(shape).contiguous(memory_format=fmt))
    assert x.grad.is_contiguous(memory_format=fmt)
    ref = F.batch_norm(x.detach().contiguous(), None, None, bn.weight.detach(),
                       bn.bias.detach(), True)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_bfloat16_under_cpu_autocast_with_float32_parameters():
    torch.manual_seed(2)
    conv = torch.nn.Conv2d(3, 4, 3)
    bn = sbt.SyncBatchNorm(4)
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y = bn(h)
    assert h.dtype == torch.bfloat16 and y.dtype == torch.bfloat16
    ref = F.batch_norm(h.double(), None, None, bn.weight.double(), bn.bias.double(), True)
    torch.testing.assert_close(y.double(), ref, atol=4 * 2 ** -7 * 4, rtol=0)
    y.float().sum().backward()
    assert bn.weight.grad.dtype == torch.float32 and conv.weight.grad is not None


def test_momentum_none_is_cumulative_average_and_no_running_stats_follows_pytorch():
    torch.manual_seed(3)
    for kw in (dict(momentum=None), dict(track_running_stats=False)):
        ref, ours = torch.nn.BatchNorm1d(3, **kw).double(), sbt.SyncBatchNorm(3, **kw).double()
        for _ in range(4):
            x = torch.randn(7, 3, dtype=torch.float64)
            torch.testing.assert_close(ours(x), ref(x))
        ref.eval(), ours.eval()
        x = torch.randn(7, 3, dtype=torch.float64)
        torch.testing.assert_close(ours(x), ref(x))
        for k, t in ref.state_dict().items():
            torch.testing.assert_close(ours.state_dict()[k], t)


class CountingComm:
    rank, size = 0, 1

    def __init__(self):
        self.calls = []

    def allreduce(self, buf):
        self.calls.append(buf.size)


def test_one_collective_per_direction_and_none_in_eval():
    comm = CountingComm()
    bn = sbt.SyncBatchNorm(6, comm=comm)
    x = torch.randn(4, 6, 5, requires_grad=True)
    n = syncbn.stats_buffer_size(6)  # 2C + 1 + fingerprint, the same both ways
    bn(x).sum().backward()
    assert comm.calls == [n, n]
    bn.eval()
    bn(x).sum().backward()
    assert comm.calls == [n, n]


def test_frozen_input_gradient_skips_the_backward_collective():
    comm = CountingComm()
    bn = sbt.SyncBatchNorm(6, comm=comm)
    bn(torch.randn(4, 6)).sum().backward()  # x needs no grad: dweight/dbias are local
    assert comm.calls == [syncbn.stats_buffer_size(6)] and bn.weight.grad is not None


def test_convert_and_revert_keep_parameters_buffers_mode_device_dtype():
    net = torch.nn.Sequential(torch.nn.Conv1d(2, 3, 1), torch.nn.BatchNorm1d(3),
                              torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.BatchNorm3d(3)))
    net = net.double().eval()
    net[1].running_mean.fill_(0.5)
    params = [p for p in net.parameters()]
    conv = sbt.convert_sync_batchnorm(net)
    assert [type(m) for m in (conv[1], conv[2][0], conv[2][1])] == [sbt.SyncBatchNorm] * 3
    # shared parameters: optimizers holding them keep working
    assert all(a is b for a, b in zip(conv.parameters(), params, strict=True))
    assert not conv[1].training and conv[1].weight.dtype == torch.float64
    assert conv[1].running_mean[0] == 0.5
    back = sbt.revert_sync_batchnorm(conv)
    assert [type(m) for m in (back[1], back[2][0], back[2][1])] == \
        [torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d]
    assert all(a is b for a, b in zip(back.parameters(), params, strict=True))


def test_convert_leaves_subclasses_with_a_warning_naming_them():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    with pytest.warns(UserWarning, match="MyBN"):
        out = sbt.convert_sync_batchnorm(torch.nn.Sequential(MyBN(3)))
    assert type(out[0]) is MyBN


def test_revert_of_a_directly_built_module_follows_the_last_input_rank():
    bn = sbt.SyncBatchNorm(3)
    assert type(sbt.revert_sync_batchnorm(bn)) is torch.nn.BatchNorm2d  # documented default
    bn(torch.randn(4, 3, 2, 2, 2))
    assert type(sbt.revert_sync_batchnorm(bn)) is torch.nn.BatchNorm3d
    bn(torch.randn(4, 3))
    assert type(sbt.revert_sync_batchnorm(bn)) is torch.nn.BatchNorm1d


def test_torch_compile_gives_the_same_result():
    torch.manual_seed(4)
    net = sbt.convert_sync_batchnorm(make_net(2))
    ref = copy.deepcopy(net)
    x = torch.randn(3, 3, 6, 6, dtype=torch.float64)
    out = torch.compile(net)(x)
    out.sum().backward()
    y = ref(x)
    y.sum().backward()
    torch.testing.assert_close(out, y)
    for a, b in zip(net.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)
    for a, b in zip(net.buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("x,exc,match", [
    # The exception types torch.nn.BatchNorm1d raises for the same inputs.
    (torch.randn(5), ValueError, r"^input: expected at least 2D input \(got 1D input"),
    (torch.randn(4, 5, 2), RuntimeError, r"^input: expected 3 channels \(num_features\)"),
    (torch.ones(4, 3, dtype=torch.int64), NotImplementedError,
     r"^input: expected a floating dtype"),
    (torch.ones(4, 3, dtype=torch.complex64), NotImplementedError,
     r"^input: expected a floating dtype"),
])
def test_bad_input_raises_before_any_collective_and_keeps_buffers(x, exc, match):
    comm = CountingComm()
    bn = sbt.SyncBatchNorm(3, comm=comm)
    before = {k: t.clone() for k, t in bn.state_dict().items()}
    with pytest.raises(exc, match=match):
        bn(x)
    assert comm.calls == []
    for k, t in bn.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_mixed_dtype_parameters_are_named():
    bn = sbt.SyncBatchNorm(3)
    bn.running_mean = torch.zeros(4)
    with pytest.raises(RuntimeError, match=r"^running_mean: expected shape \(3,\)"):
        bn(torch.randn(4, 3))


def test_comm_and_process_group_together_are_rejected():
    with pytest.raises(ValueError, match="comm, process_group"):
        sbt.SyncBatchNorm(3, comm=syncbn.comm.local(), process_group=object())


def test_deepcopy_shares_the_communicator():
    comm = syncbn.comm.local()
    bn = sbt.SyncBatchNorm(3, comm=comm)
    bn2 = copy.deepcopy(bn)
    assert bn2.communicator() is bn.communicator()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bn2(torch.randn(4, 3))


def test_pickled_module_loads_and_resolves_its_communicator_again(tmp_path):
    bn = sbt.SyncBatchNorm(3, comm=syncbn.comm.local())
    bn(torch.randn(4, 3))
    torch.save(bn, tmp_path / "bn.pt")
    loaded = torch.load(tmp_path / "bn.pt", weights_only=False)
    assert loaded.communicator().kind == "local"
    torch.testing.assert_close(loaded.running_mean, bn.running_mean)


def test_train_digits_example_syncbn_follows_the_one_process_run(tmp_path):
    import re

    out = run_mpi(2, WORKERS.parent.parent / "examples" / "train_digits.py", "--steps", "20",
                  "--out", tmp_path / "loss.png", timeout=240)
    m = re.search(r"max \|param diff\| ([0-9.e+-]+)", out.stdout)
    assert m and float(m.group(1)) < 1e-10, out.stdout
    assert (tmp_path / "loss.png").stat().st_size > 10_000


def test_a_communicator_without_allreduce_is_a_type_error_before_any_collective():
    bn = sbt.SyncBatchNorm(3, comm=object())
    before = {k: t.clone() for k, t in bn.state_dict().items()}
    with pytest.raises(TypeError, match=r"^comm: expected .*allreduce"):
        bn(torch.randn(4, 3))
    for k, t in bn.state_dict().items():
        assert torch.equal(t, before[k]), k


# ---- torch's contract to the letter (torch.nn.SyncBatchNorm's class, signature, errors) ----


def test_is_a_torch_syncbatchnorm_with_torchs_positional_signature_and_bias_false():
    bn = sbt.SyncBatchNorm(3, 1e-5, 0.1, True, True, None, None, torch.float64, bias=False)
    assert isinstance(bn, torch.nn.SyncBatchNorm) and bn.process_group is None
    assert bn.weight is not None and bn.bias is None  # affine weight, no bias (torch >= 2.13)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64, bias=False)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        ref.weight.copy_(bn.weight)
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    dy = torch.randn_like(x)
    g = torch.autograd.grad(bn(x), (x, bn.weight), dy)
    gr = torch.autograd.grad(ref(x), (x, ref.weight), dy)
    for a, b in zip(g, gr, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(bn.running_var, ref.running_var)


def test_convert_and_revert_keep_bias_false():
    net = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3, bias=False))
    s = sbt.convert_sync_batchnorm(net)
    assert isinstance(s[1], sbt.SyncBatchNorm) and s[1].bias is None and s[1].weight is not None
    back = sbt.revert_sync_batchnorm(s)
    assert type(back[1]) is torch.nn.BatchNorm2d and back[1].bias is None


def test_convert_takes_a_communicator_in_torchs_process_group_position():
    comm = syncbn.comm.local()
    net = sbt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm1d(3)), comm)
    assert net[0].process_group is None and net[0].communicator() is comm
    bn = sbt.SyncBatchNorm(3, 1e-5, 0.1, True, True, comm)  # the same in the constructor
    assert bn.process_group is None and bn.communicator() is comm
    assert sbt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3)).__class__ is \
        sbt.SyncBatchNorm  # torch's classmethod spelling makes syncbn's layers too


@pytest.mark.parametrize("eps", [0.0, -1e-5])
def test_eps_not_positive_raises_in_training_like_torch(eps):
    x = torch.randn(4, 3)
    for m in (torch.nn.BatchNorm1d(3, eps=eps), sbt.SyncBatchNorm(3, eps=eps)):
        with pytest.raises(ValueError, match="eps must be positive during training"):
            m(x)
    # eval: torch accepts eps == 0 and refuses a negative one; so do we (its own kernel)
    outs = []
    for m in (torch.nn.BatchNorm1d(3, eps=eps).eval(), sbt.SyncBatchNorm(3, eps=eps).eval()):
        if eps < 0:
            with pytest.raises(ValueError, match="non-negative"):
                m(x)
        else:
            outs.append(m(x))
    if outs:
        torch.testing.assert_close(outs[0], outs[1])


def test_momentum_is_only_read_where_torch_reads_it():
    x = torch.randn(4, 3, dtype=torch.float64)
    bn = sbt.SyncBatchNorm(3, momentum=float("nan"), dtype=torch.float64).eval()
    ref = torch.nn.BatchNorm1d(3, momentum=float("nan"), dtype=torch.float64).eval()
    torch.testing.assert_close(bn(x), ref(x))  # eval ignores it
    bn.train(), ref.train()
    bn.momentum = ref.momentum = 1.5  # torch takes any number in training
    torch.testing.assert_close(bn(x), ref(x))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)


DDP_SCRIPT = r"""
import sys, tempfile, torch, torch.distributed as dist
import syncbn.torch as sbt
dist.init_process_group("gloo", init_method=f"file://{sys.argv[1]}", rank=0, world_size=1)
net = sbt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Linear(4, 3),
                                                     torch.nn.BatchNorm1d(3)))
ddp = torch.nn.parallel.DistributedDataParallel(net)
ddp(torch.randn(5, 4)).sum().backward()
print("has_sync_bn", ddp._get_ddp_logging_data().get("has_sync_bn"))
print("comm", net[1].communicator().kind)
try:
    torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(torch.nn.SyncBatchNorm(3)))
except ValueError as e:
    print("torch's own:", e)
"""


def test_ddp_on_cpu_counts_it_as_syncbatchnorm_and_trains(tmp_path):
    """DDP refuses torch's SyncBatchNorm on CPU (it cannot run there) and still does;
    syncbn's layer, a torch.nn.SyncBatchNorm too, trains on CPU under DDP, which logs
    has_sync_bn."""
    out = subprocess.run([sys.executable, "-c", DDP_SCRIPT, str(tmp_path / "store")],
                         capture_output=True, text=True, timeout=120, cwd=WORKERS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "has_sync_bn 1" in out.stdout or "has_sync_bn True" in out.stdout, out.stdout
    assert "comm python" in out.stdout  # the default group, as torch.distributed
    assert "torch's own: SyncBatchNorm layers only work with GPU modules" in out.stdout
