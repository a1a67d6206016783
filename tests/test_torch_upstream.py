"""PyTorch's own BatchNorm tests, as far as the torch wheel ships them, against syncbn's class.

- module_db: the BatchNorm1d/2d/3d entries of torch.testing._internal.common_modules (their
  constructor and forward inputs, error inputs, flags) driven through the generic checks that
  test/test_modules.py makes of every module (forward, factory kwargs, repr, pickle, gradcheck,
  gradgradcheck, memory formats, non-contiguous inputs, train/eval flag, meta-device
  construction, errors), written here, each run on syncbn's class and on torch's own with the
  same inputs: results equal torch's under torch's default tolerances for the dtype.
- distributed_test.py: every SyncBatchNorm test of DistributedTest._DistTestBase, PyTorch's
  code and assertions, on gloo with 2 ranks and torch.nn.SyncBatchNorm swapped for syncbn's
  (tests/workers/torch_upstream_dist.py says how the GPU-only ones run on the CPU).

test_nn.py and test_modules.py themselves do not ship in the wheel: tests/torch_upstream/
run_upstream.py runs them from a PyTorch checkout (README, "PyTorch's own tests").
"""

from __future__ import annotations

import copy
import io
import json
import sys
from pathlib import Path

import pytest
import torch

from conftest import WORKERS, run_torchrun

sys.path.insert(0, str(Path(__file__).resolve().parent / "torch_upstream"))
import swap  # noqa: E402
from torch.testing._internal import common_modules as cm  # noqa: E402
from torch.testing._internal.common_utils import gradcheck, gradgradcheck  # noqa: E402

import syncbn.torch as sbt  # noqa: E402

ENTRIES = {i.module_cls.__name__: i for i in cm.module_db
           if i.module_cls in swap.TORCH_BATCHNORM.values()}
DIM = {"BatchNorm1d": 1, "BatchNorm2d": 2, "BatchNorm3d": 3}
close = torch.testing.assert_close  # torch's default tolerances for the dtype


def test_swap_is_in_effect_and_undone():
    before = swap.constructions["count"]
    with swap.swap(module_db=True):
        for dim, cls in swap.OURS.items():
            m = getattr(torch.nn, f"BatchNorm{dim}d")(4)
            assert type(m) is cls and isinstance(m, sbt.SyncBatchNorm)
            assert isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        assert type(torch.nn.SyncBatchNorm(4)) is sbt.SyncBatchNorm
        assert {ENTRIES[n].module_cls for n in DIM} == set(swap.OURS.values())
        with pytest.raises(ValueError, match="expected 4D input"):  # torch's rank check
            torch.nn.BatchNorm2d(3)(torch.randn(2, 3, 4))
    assert swap.constructions["count"] == before + 5
    assert torch.nn.BatchNorm2d is swap.TORCH_BATCHNORM[2]
    assert torch.nn.SyncBatchNorm is swap.TORCH_SYNC
    assert ENTRIES["BatchNorm2d"].module_cls is torch.nn.BatchNorm2d
    m = torch.nn.BatchNorm2d(3)
    assert swap.constructions["count"] == before + 5 and not isinstance(m, sbt.SyncBatchNorm)


def _inputs(info, dtype, training, requires_grad=True):
    return info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=requires_grad,
                                   training=training)


def _pair(info, mi, dtype, training):
    """(syncbn's module, torch's module) built from one ModuleInput, same state."""
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    ours = swap.OURS[DIM[info.module_cls.__name__]](*args, **kwargs).to(dtype).train(training)
    ref = info.module_cls(*args, **kwargs).to(dtype).train(training)
    ref.load_state_dict(ours.state_dict())
    return ours, ref


def _fresh(x):
    return x.detach().clone().requires_grad_(x.requires_grad)


def _run(m, x, grad):
    """Output, input gradient and parameter gradients of one forward/backward."""
    x = _fresh(x)
    y = m(x)
    if not y.requires_grad:
        return y, None, []
    gx = torch.autograd.grad(y, [x, *m.parameters()], grad.to(memory_format=torch.preserve_format),
                             allow_unused=True)
    return y, gx[0], list(gx[1:])


def _same_state(ours, ref):
    for (n, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        close(a, b, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DIM))
def test_module_db_forward_backward_state_equal_torch(name, training):
    """test_modules' forward (with its reference_fn when given), and outputs, input and
    parameter gradients, running stats and num_batches_tracked equal to torch's class."""
    info = ENTRIES[name]
    for dtype in (torch.float32, torch.float64):
        for mi in _inputs(info, dtype, training):
            ours, ref = _pair(info, mi, dtype, training)
            (x,) = mi.forward_input.args
            grad = torch.randn_like(x if x.numel() else x.detach())
            for _ in range(2):  # a second step sees the updated running stats
                y, gx, gp = _run(ours, x, grad)
                y_ref, gx_ref, gp_ref = _run(ref, x, grad)
                close(y, y_ref)
                if gx_ref is not None:
                    close(gx, gx_ref)
                    for a, b in zip(gp, gp_ref, strict=True):
                        close(a, b)
                _same_state(ours, ref)
            if mi.reference_fn is not None:
                close(ours(x), mi.reference_fn(ours, x))
            assert type(ours) is swap.OURS[DIM[name]]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DIM))
def test_module_db_memory_formats_and_non_contiguous(name, training):
    """test_modules' test_memory_format and test_non_contiguous_tensors: channels_last(_3d)
    inputs (and module formats) give the contiguous result in the input's format, and
    non-contiguous inputs and gradients give the contiguous results."""
    info = ENTRIES[name]
    for dtype in (torch.float32, torch.float64):
        for mi in _inputs(info, dtype, training):
            ours, ref = _pair(info, mi, dtype, training)
            (x,) = mi.forward_input.args
            grad = torch.rand_like(x)
            snapshot = copy.deepcopy(ours.state_dict())
            y0, gx0, gp0 = _run(ours, x, grad)
            fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
            cases = [(torch.contiguous_format, torch.preserve_format)]
            if fmt is not None:
                cases += [(fmt, m) for m in (torch.preserve_format, torch.contiguous_format, fmt)]
                cases += [(torch.contiguous_format, fmt)]
            for in_fmt, mod_fmt in cases:
                ours.load_state_dict(snapshot)
                ours.to(memory_format=mod_fmt)
                xf = x.detach().clone().to(memory_format=in_fmt).requires_grad_()
                gf = grad.clone().to(memory_format=in_fmt)
                y, gx, gp = _run(ours, xf, gf)
                close(y, y0)
                want = in_fmt if in_fmt is not torch.contiguous_format else torch.contiguous_format
                assert y.is_contiguous(memory_format=want), (in_fmt, mod_fmt)
                if gx is not None:
                    close(gx, gx0)
                    assert gx.is_contiguous(memory_format=want)
                    for a, b in zip(gp, gp0, strict=True):
                        close(a, b)

            def nc(t):  # test_modules' way: a strided view of a repeated tensor
                return torch.repeat_interleave(t.detach(), 2, dim=-1)[..., ::2]

            if x.dim() > 0:
                for xin, gin in [(nc(x), grad), (x, nc(grad)), (nc(x), nc(grad))]:
                    ours.load_state_dict(snapshot)
                    assert not xin.is_contiguous() or not gin.is_contiguous() or x.numel() == 0
                    y, gx, gp = _run(ours, xin.requires_grad_(), gin)
                    close(y, y0)
                    if gx is not None:
                        close(gx, gx0, atol=1e-4, rtol=0)  # test_modules' tolerance
                        for a, b in zip(gp, gp0, strict=True):
                            close(a, b)
            del ref


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(DIM))
def test_module_db_gradcheck_and_gradgradcheck(name, training):
    """test_modules' test_grad and test_gradgrad (float64): PyTorch's testing gradcheck
    (batched gradients, fast mode) of the output over input and parameters together, then
    over the input with each parameter alone."""
    info = ENTRIES[name]
    assert info.supports_gradgrad
    for mi in _inputs(info, torch.float64, training):
        ours, _ = _pair(info, mi, torch.float64, training)
        (x,) = mi.forward_input.args
        params = tuple(ours.parameters())
        names = [n for n, _ in ours.named_parameters()]

        def fn(x, *ps, ours=ours, names=names):
            return torch.func.functional_call(ours, dict(zip(names, ps, strict=True)), (x,))

        for check in (gradcheck, gradgradcheck):
            assert check(fn, (x, *params))
            for i in range(len(params)):
                ps = tuple(p.detach().requires_grad_(j == i) for j, p in enumerate(params))
                assert check(fn, (x, *ps))


@pytest.mark.parametrize("name", list(DIM))
def test_module_db_construction_pickle_repr_errors(name):
    """test_modules' test_factory_kwargs, test_device_ctx_init (meta), test_repr,
    test_pickle (a whole module through torch.save), test_if_train_and_eval_modes_differ and
    test_errors (module_error_inputs_func), plus state dicts that load both ways."""
    info = ENTRIES[name]
    ours_cls = swap.OURS[DIM[name]]
    for training in (True, False):
        for dtype in (torch.float32, torch.float64):
            for mi in _inputs(info, dtype, training, requires_grad=False):
                args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
                m = ours_cls(*args, **kwargs, device="cpu", dtype=dtype).train(training)
                for t in [*m.parameters(), *m.buffers()]:
                    assert t.device.type == "cpu"
                    assert not t.dtype.is_floating_point or t.dtype == dtype
                repr(m), str(m)
                with torch.device("meta"):
                    meta = ours_cls(*args, **kwargs)
                cpu = ours_cls(*args, **kwargs)
                for a, b in zip([*meta.parameters(), *meta.buffers()],
                                [*cpu.parameters(), *cpu.buffers()], strict=True):
                    assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype
                ref = info.module_cls(*args, **kwargs).to(dtype)
                ref.load_state_dict(m.state_dict())
                m.load_state_dict(ref.state_dict())
                (x,) = mi.forward_input.args
                y = m(x)
                buf = io.BytesIO()
                torch.save(m, buf)
                buf.seek(0)
                copy_ = torch.load(buf, weights_only=False)
                assert type(copy_) is ours_cls
                close(copy_(x), y) if not training else close(copy_(x), m(x))
                delattr(m, "training")
                with pytest.raises(AttributeError, match="'training'"):
                    m(x)
                assert info.train_and_eval_differ
    for training in (True, False):
        for err in info.module_error_inputs_func(info, device="cpu", dtype=torch.float32,
                                                 requires_grad=False, training=training):
            mi = err.module_error_input
            if err.error_on == cm.ModuleErrorEnum.CONSTRUCTION_ERROR:
                with pytest.raises(err.error_type, match=err.error_regex):
                    ours_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
            else:
                m = ours_cls(*mi.constructor_input.args, **mi.constructor_input.kwargs)
                with pytest.raises(err.error_type, match=err.error_regex):
                    m(*mi.forward_input.args, **mi.forward_input.kwargs)


# distributed_test.py's SyncBatchNorm tests (PyTorch's code) at the time of torch 2.14.1; a
# newer torch adding one makes the first assertion name it.
DIST_TESTS = {
    "test_DistributedDataParallel_SyncBatchNorm",
    "test_DistributedDataParallel_SyncBatchNorm_2D_Input",
    "test_DistributedDataParallel_SyncBatchNorm_Channels_Last",
    "test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_Running_Value",
    "test_DistributedDataParallel_SyncBatchNorm_Diff_Input_Sizes_gradient",
    "test_DistributedDataParallel_SyncBatchNorm_No_Affine",
    "test_DistributedDataParallel_SyncBatchNorm_Single_Input_Per_Process",
    "test_DistributedDataParallel_SyncBatchNorm_half",
    "test_SyncBatchNorm_process_group",
    "test_ddp_inference",
    "test_ddp_sync_bn_training_vs_eval",
    "test_ddp_uneven_inputs_stop_iteration_sync_bn",
    "test_sync_bn_logged",
}
# Skipped by PyTorch itself (unittest.skip: "Test is failing", pytorch#113620).
DIST_SKIPPED_UPSTREAM = {"test_ddp_sync_bn_training_vs_eval"}


def test_distributed_test_syncbatchnorm_tests_under_torchrun_gloo(tmp_path):
    out = tmp_path / "results.json"
    run_torchrun(2, WORKERS / "torch_upstream_dist.py", out, "ours", timeout=240)
    results = json.loads(out.read_text())
    assert set(results) >= DIST_TESTS, sorted(set(results) - DIST_TESTS)
    failed = {n: r["reason"] for n, r in results.items() if r["outcome"] == "failed"}
    assert not failed, json.dumps({n: results[n] for n in failed}, indent=1)[-6000:]
    skipped = {n for n, r in results.items() if r["outcome"] == "skipped"}
    assert skipped == DIST_SKIPPED_UPSTREAM, skipped
    for n, r in results.items():  # the class under test was syncbn's on every rank
        assert n in skipped or min(r["built"]) > 0, (n, r)
