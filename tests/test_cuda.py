"""The GPU path (DESIGN.md: same equivalence on CUDA, NCCL on the caller's stream, no host
sync, CUDA-graph capturable). Everything but the first test needs a CUDA device and is
skipped without one; `.ci/run` has nvcc but no GPU, so there the first test proves the
CUDA module is built, imports, and reports no device."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

import syncbn
import syncbn.torch as sbt

from conftest import WORKERS, run_mpi
from reference import as_f64, bn_backward_ref, bn_forward_ref, running_stats_ref

INFO = syncbn.build_info()
GPU = INFO["cuda"] and INFO["cuda_devices"] > 0 and torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(not GPU, reason="needs a CUDA device and syncbn's CUDA module")
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2 ** -9,
       torch.bfloat16: 2 ** -6}


def test_cuda_module_is_built_where_nvcc_is_and_reports_the_devices():
    if shutil.which("nvcc") is None and INFO["cuda"] is False:
        pytest.skip("no nvcc on this machine: the CPU-only build is the expected one")
    assert INFO["cuda"] is True, "nvcc is on PATH but the CUDA module was not built"
    from syncbn import _cuda

    assert INFO["cuda_devices"] == _cuda.device_count() == torch.cuda.device_count()
    assert INFO["cuda_architectures"] and INFO["cuda_runtime"] > 0
    import importlib

    assert importlib.import_module("syncbn._cuda").backend() is not None


def close(got, ref, dtype, what):
    ref = as_f64(ref)
    got = as_f64(got)
    tol = TOL[dtype]
    err = np.abs(got - ref) / np.maximum(1.0, np.abs(ref))
    assert got.shape == ref.shape and np.all(np.isfinite(got)), what
    assert err.size == 0 or err.max() <= tol, f"{what}: {err.max():.3g} > {tol}"


CASES = [  # (shape, axis, layout): both regimes of channels-first, channels-last, odd C
    ((8, 6, 5, 5), 1, "contiguous"),
    ((8, 6, 5, 5), 1, "channels_last"),
    ((3, 4, 40, 40), 1, "contiguous"),  # few channels, large H*W
    ((16, 67, 3, 3), 1, "contiguous"),  # many channels, small H*W, C not a power of two
    ((5, 7), 1, "contiguous"),
    ((2, 3, 4, 5, 6), 1, "channels_last"),
    ((6, 5, 4), -1, "contiguous"),
    ((6, 5, 8), 1, "strided"),
    ((0, 3, 4), 1, "contiguous"),
]


def make(shape, layout, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        return x.cuda().contiguous(memory_format=fmt)
    if layout == "strided":
        return torch.cat([x, x], dim=-1).cuda()[..., ::2]
    return x.cuda()


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape,axis,layout", CASES)
def test_cuda_functional_matches_float64_reference(shape, axis, layout, dtype):
    x, dy = make(shape, layout, dtype, 0), make(shape, layout, dtype, 1)
    C = shape[axis]
    w = torch.rand(C, device="cuda") + 0.5
    b = torch.rand(C, device="cuda")
    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, axis=axis, comm=syncbn.comm.local())
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    assert y.is_cuda and y.dtype == dtype and y.stride() == x.stride() or layout == "strided"
    if x.numel() == 0:
        assert y.numel() == 0 and torch.all(rm == 0)
        return
    close(y, bn_forward_ref(x, w, b, axis), dtype, "y")
    rdx, rdw, rdb = bn_backward_ref(dy, x, w, axis)
    close(dx, rdx, dtype, "dx")
    np.testing.assert_allclose(as_f64(dw), rdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(as_f64(db), rdb, rtol=1e-4, atol=1e-4)
    rm_ref, rv_ref = running_stats_ref(np.zeros(C), np.ones(C), x, axis)
    np.testing.assert_allclose(as_f64(rm), rm_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(as_f64(rv), rv_ref, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_cuda_large_offset_and_constant_channel():
    x = torch.randn(64, 3, 100, dtype=torch.float64)
    x[:, 0] = x[:, 0] * 0.5 + 5e3  # mean 1e4 x std
    x[:, 1] = 7.0
    x = x.float().cuda()
    rm, rv = torch.zeros(3, device="cuda"), torch.ones(3, device="cuda")
    y, _ = syncbn.batch_norm_forward(x, None, None, rm, rv, momentum=1.0,
                                     comm=syncbn.comm.local())
    _, var, uvar, _ = __import__("reference").batch_moments(x, 1)
    assert abs(float(rv[0]) / uvar[0] - 1) < 1e-4 and float(rv[1]) >= 0
    assert torch.isfinite(y).all()


@needs_gpu
def test_torch_adapter_on_cuda_equals_batchnorm_and_keeps_channels_last():
    torch.manual_seed(0)
    ref = torch.nn.BatchNorm2d(5).cuda().double()
    ours = sbt.SyncBatchNorm(5, comm=syncbn.comm.local()).cuda().double()
    for _ in range(3):
        x = torch.randn(4, 5, 6, 6, device="cuda", dtype=torch.float64)
        x = x.contiguous(memory_format=torch.channels_last)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        assert ya.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(ya, yb)
        g = torch.randn_like(x)  # sum(y) would have a zero input gradient
        (ya * g).sum().backward(), (yb * g).sum().backward()
        torch.testing.assert_close(xa.grad, xb.grad)
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad)
    for k, t in ref.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[k], t)


@needs_gpu
def test_nccl_world_size_one_on_the_current_stream():
    if not INFO["nccl"]:
        pytest.fail("a GPU is here but this build has no NCCL: install the cuda extra")
    from mpi4py import MPI

    comm = syncbn.comm.nccl(MPI.COMM_SELF)
    assert (comm.rank, comm.size, comm.kind) == (0, 1, "nccl")
    bn = sbt.SyncBatchNorm(4, comm=comm).cuda()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        x = torch.randn(8, 4, 5, device="cuda", requires_grad=True)
        g = torch.randn(8, 4, 5, device="cuda")
        y = bn(x)
        (y * g).sum().backward()
    torch.cuda.synchronize()
    xr = x.detach().clone().requires_grad_()
    ref = torch.nn.functional.batch_norm(xr, None, None, bn.weight.detach(),
                                         bn.bias.detach(), True)
    (ref * g).sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-4, atol=1e-5)


@needs_gpu
@pytest.mark.parametrize("kind", ["local", "nccl"])
def test_cuda_graph_capture_of_forward_and_backward(kind):
    if kind == "nccl":
        if not INFO["nccl"]:
            pytest.fail("a GPU is here but this build has no NCCL: install the cuda extra")
        from mpi4py import MPI

        comm = syncbn.comm.nccl(MPI.COMM_SELF)  # its all-reduces are captured too
    else:
        comm = syncbn.comm.local()
    bn = sbt.SyncBatchNorm(8, comm=comm).cuda()
    x = torch.randn(16, 8, 4, 4, device="cuda", requires_grad=True)
    gw = torch.randn(16, 8, 4, 4, device="cuda")  # so the gradient is far from zero
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (allocator pools) outside the capture
        for _ in range(2):
            (bn(x) * gw).square().sum().backward()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    x.grad = None
    with torch.cuda.graph(g):
        loss = (bn(x) * gw).square().sum()
        loss.backward()
    for scale in (1.0, 3.0):  # replays recompute from whatever x holds now
        with torch.no_grad():
            x.mul_(scale).add_(0.5)
        g.replay()
        torch.cuda.synchronize()
        ref_x = x.detach().clone().requires_grad_()
        ref = torch.nn.functional.batch_norm(ref_x, None, None, bn.weight.detach(),
                                             bn.bias.detach(), True)
        (ref * gw).square().sum().backward()
        torch.testing.assert_close(loss, (ref * gw).square().sum(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-4, atol=1e-4)


@needs_gpu
def test_cupy_module_has_the_numpy_interface():
    cupy = pytest.importorskip("cupy")
    from syncbn.cupy import SyncBatchNorm

    bn = SyncBatchNorm(3, comm=syncbn.comm.local())
    x = cupy.asarray(np.random.default_rng(0).standard_normal((6, 3, 4)) * 2 + 1,
                     dtype=cupy.float32)
    y = bn.forward(x)
    dy = cupy.asarray(np.random.default_rng(1).standard_normal((6, 3, 4)), dtype=cupy.float32)
    dx = bn.backward(dy)
    assert isinstance(y, cupy.ndarray) and isinstance(dx, cupy.ndarray)
    close(y.get(), bn_forward_ref(x.get()), torch.float32, "y")
    rdx, rdw, rdb = bn_backward_ref(dy.get(), x.get())
    close(dx.get(), rdx, torch.float32, "dx")
    np.testing.assert_allclose(bn.grad_weight.get(), rdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.grad_bias.get(), rdb, rtol=1e-4, atol=1e-4)
    assert int(bn.num_batches_tracked) == 1
    rm_ref, rv_ref = running_stats_ref(np.zeros(3), np.ones(3), x.get(), 1)
    np.testing.assert_allclose(bn.running_mean.get(), rm_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_var.get(), rv_ref, rtol=1e-5, atol=1e-5)
    bn.forward(x, training=False)  # eval: the running stats, no communication
    assert int(bn.num_batches_tracked) == 1


@needs_gpu
@pytest.mark.parametrize("nranks", [2, 3, 4])
def test_mpi_ranks_sharing_one_gpu_with_device_buffers(nranks, tmp_path):
    import json

    from test_mpi_equivalence import make_data, reference_step

    case = dict(sizes=[3, 0, 2, 1], tail=(3, 5, 4), axis=1, dtype="float32",
                layout="torch_cuda", steps=2, momentum=0.1, eps=1e-5)
    sizes, data = make_data("cuda", case, nranks, tmp_path / "data.npz")
    case.update(sizes=sizes, data=str(tmp_path / "data.npz"))
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_mpi(nranks, WORKERS / "equivalence.py", tmp_path / "case.json", tmp_path)
    res = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(nranks)]
    offs = np.cumsum([0] + sizes)
    for s in range(2):
        x = np.concatenate([res[r][f"xin{s}"] for r in range(nranks)])
        dy = np.concatenate([res[r][f"dyin{s}"] for r in range(nranks)])
        ref = reference_step(x, dy, data["weight"], data["bias"], 1)
        for r in range(nranks):
            sl = slice(offs[r], offs[r + 1])
            np.testing.assert_allclose(res[r][f"y{s}"], ref["y"][sl], rtol=3e-5, atol=3e-5)
            np.testing.assert_allclose(res[r][f"dx{s}"], ref["dx"][sl], rtol=3e-5, atol=3e-5)


def test_cuda_kernels_run_correctly_under_cpu_emulation(tmp_path):
    """The real kernel source (core/src/cuda/*.cu, launches rewritten) built for the host
    with a shim that runs each block's threads as coroutines (real __syncthreads and warp
    shuffle semantics), checked against sequential references: the kernels' logic is
    tested even where no GPU is (CI). It cannot see GPU-only faults (alignment, memory
    model, graph capture): test_cuda's GPU tests do."""
    import os
    import subprocess

    script = WORKERS.parent / "cuda_emu" / "build_emu.sh"
    out = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, EMU_OUT=str(tmp_path)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = [ln for ln in out.stdout.splitlines() if "checks," in ln]
    assert len(lines) == 2 and all(" 0 failures" in ln for ln in lines), out.stdout[-3000:]
    assert int(lines[0].split()[0]) > 10000  # the big matrix of cases ran


def test_cuda_orchestration_runs_correctly_under_cpu_emulation(tmp_path):
    """The device backend's orchestration (core/src/cuda/ops.cu: layouts and packing,
    scratch, per-channel conversions, running stats, counts, eval, backward variants,
    host-staged all-reduce) built with the emulated kernels, linked with the real core and
    driven through the public C++ API (syncbn/ops.h) on CUDA-flagged views, checked against
    a float64 reference of the global batch, the CPU path, and forward/backward against the
    composed primitives. Run alone (LocalCommunicator under emulated CUDA-graph capture: no
    sync, no host copy; fake communicators of each kind) and under `mpiexec -n 3`
    (MpiCommunicator, uneven ranks, one of them empty). Fingerprinted collectives: the
    device's fingerprint equals the CPU path's; faults (ranks that disagree, a broken sum)
    give NaN on the stream or the host path's exception with nothing written; under MPI a
    real disagreement raises CollectiveMismatchError on every rank, which then go on."""
    import os
    import subprocess
    import sys

    from conftest import ROOT, mpiexec_path

    script = WORKERS.parent / "cuda_emu" / "build_emu_ops.sh"
    env = dict(os.environ, EMU_OUT=str(tmp_path), MPI_PREFIX=sys.prefix)
    build = subprocess.run(["bash", str(script), "--build-only"], capture_output=True, text=True,
                           timeout=600, env=env)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    exe = str(tmp_path / "test_ops")

    def checks(proc, nranks):
        out = proc.stdout[-4000:] + proc.stderr[-2000:]
        lines = [ln for ln in proc.stdout.splitlines() if " checks, " in ln]
        assert proc.returncode == 0, out
        assert len(lines) == nranks and all(" 0 failures " in ln for ln in lines), out
        return min(int(ln.split()[0]) for ln in lines)

    local = subprocess.run([exe, "local"], capture_output=True, text=True, timeout=600, env=env)
    assert checks(local, 1) > 20000  # the whole matrix ran
    mpi = subprocess.run([mpiexec_path(), "-n", "3", exe, "mpi"], capture_output=True, text=True,
                         timeout=600, env=dict(env, MPIEXEC_TIMEOUT="300"), cwd=ROOT)
    assert checks(mpi, 3) > 8000


@needs_gpu
def test_nccl_split_and_bootstrap_from_a_syncbn_mpi_communicator():
    if not INFO["nccl"]:
        pytest.fail("a GPU is here but this build has no NCCL: install the cuda extra")
    from mpi4py import MPI

    parent = syncbn.comm.nccl(syncbn.comm.mpi(MPI.COMM_SELF))
    sub = syncbn.comm.split(parent, 0, key=7)
    assert (sub.kind, sub.rank, sub.size) == ("nccl", 0, 1)
    assert syncbn.comm.split(parent, None) is None  # NCCL_SPLIT_NOCOLOR
    x = torch.randn(6, 3, 4, device="cuda", dtype=torch.float64)
    for comm in (parent, sub):
        y, ctx = syncbn.batch_norm_forward(x, comm=comm)
        close(y, bn_forward_ref(x, None, None, 1), torch.float64, f"y over {comm!r}")
        assert ctx.count.is_cuda and float(ctx.count[0]) == 24


@needs_gpu
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_cupy_functional_on_a_non_default_stream_matches_reference(dtype):
    import warnings

    cupy = pytest.importorskip("cupy")
    rng = np.random.default_rng(3)
    xh, dyh = rng.standard_normal((5, 6, 7)) * 3 + 2, rng.standard_normal((5, 6, 7))
    w, b = (rng.random(6) + 0.5).astype(np.float32), rng.random(6).astype(np.float32)
    stream = cupy.cuda.Stream(non_blocking=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. a deprecated DLPack export
        with stream:
            x, dy = cupy.asarray(xh, dtype=dtype), cupy.asarray(dyh, dtype=dtype)
            rm, rv = cupy.zeros(6, cupy.float32), cupy.ones(6, cupy.float32)
            y, ctx = syncbn.batch_norm_forward(x, cupy.asarray(w), cupy.asarray(b), rm, rv,
                                               comm=syncbn.comm.local())
            dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
        stream.synchronize()
    assert all(isinstance(a, cupy.ndarray) for a in (y, dx, dw, db))
    tdt = {"float32": torch.float32, "float16": torch.float16}[dtype]
    xr, dyr = x.get(), dy.get()  # the rounded inputs
    close(y.get(), bn_forward_ref(xr, w, b, 1), tdt, "y")
    rdx, rdw, rdb = bn_backward_ref(dyr, xr, w, 1)
    close(dx.get(), rdx, tdt, "dx")
    np.testing.assert_allclose(dw.get(), rdw, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(db.get(), rdb, rtol=1e-4, atol=1e-4)
    rm_ref, rv_ref = running_stats_ref(np.zeros(6), np.ones(6), xr, 1)
    np.testing.assert_allclose(rm.get(), rm_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(rv.get(), rv_ref, rtol=1e-5, atol=1e-5)


@needs_gpu
def test_torch_nccl_process_group_gives_one_shared_nccl_communicator():
    if not INFO["nccl"]:
        pytest.fail("a GPU is here but this build has no NCCL: install the cuda extra")
    from test_torch_adapter import run_torchrun

    proc = run_torchrun(1, WORKERS / "torch_nccl.py")
    assert "OK torch_nccl" in proc.stdout, proc.stdout[-3000:]
