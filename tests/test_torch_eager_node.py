"""syncbn.torch's C++ autograd node (libsyncbn_torch_eager, README "The C++ autograd node"):
used where it was built, equal bit for bit to the Python autograd.Function it stands in
for, and the Python Function still right across ranks where the node is not loaded."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

import syncbn
import syncbn.torch as sbt

from conftest import WORKERS, run_mpi

BUILT = syncbn.build_info()["torch"]
needs_node = pytest.mark.skipif(
    BUILT != torch.__version__,
    reason=f"the C++ autograd node was built for torch {BUILT}, this is {torch.__version__} "
           "(CI builds it: SYNCBN_WITH_TORCH=ON)")


def _paths(tmp_path, eager):
    out = tmp_path / f"{eager}.pt"
    env = dict(os.environ, SYNCBN_TORCH_EAGER=eager)
    subprocess.run([sys.executable, str(WORKERS / "torch_eager_paths.py"), str(out)], env=env,
                   check=True, timeout=240)
    return torch.load(out)


@needs_node
def test_node_runs_training_and_equals_the_python_function_bit_for_bit(tmp_path):
    cpp, py = _paths(tmp_path, "cpp"), _paths(tmp_path, "python")
    assert cpp.pop("native") is True and py.pop("native") is False
    assert set(cpp) == set(py)
    for case, a in cpp.items():
        b = py[case]
        assert set(a) == set(b), case
        for step in (0, 1):
            assert a[f"grad_fn{step}"] == "SyncBatchNormBackward", case
            assert b[f"grad_fn{step}"] == "_SyncBatchNormFunctionBackward", case
        for k, va in a.items():
            if k.startswith("grad_fn"):
                continue
            vb = b[k]
            if isinstance(va, dict):  # the state dict: running stats, num_batches_tracked
                assert set(va) == set(vb), case
                for s in va:
                    assert torch.equal(va[s], vb[s]), (case, s)
            elif isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (case, k)
            else:
                assert va == vb, (case, k)
    # The cases moved the running stats (not a comparison of two untouched buffers).
    assert not torch.equal(cpp["nchw_f32"]["state"]["running_mean"], torch.zeros(3))
    assert int(cpp["nchw_f32"]["state"]["num_batches_tracked"]) == 2


@needs_node
def test_node_errors_keep_their_python_types():
    m = sbt.SyncBatchNorm(3)
    assert sbt._native is not None
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3))
    before = m.running_mean.clone(), int(m.num_batches_tracked)
    # A Python communicator's own exception, in forward and in backward.

    class Boom(RuntimeError):
        pass

    class Comm:
        rank, size, calls = 0, 1, 0

        def allreduce(self, buf):
            Comm.calls += 1
            if Comm.calls == self.fail_at:
                raise Boom(f"call {Comm.calls}")

    comm = Comm()
    layer = sbt.SyncBatchNorm(3, comm=comm)
    x = torch.randn(4, 3, requires_grad=True)
    comm.fail_at = 1
    with pytest.raises(Boom, match="call 1"):
        layer(x)
    assert torch.equal(layer.running_mean, torch.zeros(3))
    assert int(layer.num_batches_tracked) == 0  # nothing half-updated
    comm.fail_at = 3
    y = layer(x)
    assert y.grad_fn.name() == "SyncBatchNormBackward"
    with pytest.raises(Boom, match="call 3"):
        y.sum().backward()
    assert x.grad is None
    assert torch.equal(m.running_mean, before[0]) and int(m.num_batches_tracked) == before[1]


def test_node_is_not_loaded_under_another_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    monkeypatch.setattr(sbt._core, "build_info", lambda: {"torch": "9.9.9"})
    with pytest.warns(UserWarning, match="built against torch 9.9.9, not this torch 0.0.0"):
        assert sbt._load_native() == (None, None)
    monkeypatch.setenv("SYNCBN_TORCH_EAGER", "fast")
    with pytest.raises(ValueError, match="SYNCBN_TORCH_EAGER: expected 'cpp' or 'python'"):
        sbt._load_native()
    monkeypatch.setenv("SYNCBN_TORCH_EAGER", "python")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sbt._load_native() == (None, None)


def test_python_function_trains_equal_to_batchnorm_across_ranks(tmp_path):
    """The Python Function (the path without the node) under mpiexec -n 3, uneven and empty
    ranks: every parameter and buffer against BatchNorm on the concatenated batch (the
    default-path runs of this check are in test_torch_adapter.py)."""
    from test_torch_adapter import check_training_results

    env = dict(os.environ, SYNCBN_TORCH_EAGER="python")
    run_mpi(3, WORKERS / "torch_train.py", tmp_path, "mpi", timeout=300, env=env)
    check_training_results(tmp_path, 3)
    assert not any(torch.load(tmp_path / f"rank{r}.pt")["native"] for r in range(3))


def test_compiled_autograd_gets_the_traceable_python_function():
    """Compiled autograd traces backward nodes; the C++ node's backward reads memory and
    cannot be traced, so a forward that compiled autograd may see runs the Python Function
    (a graph break there) and gives eager's gradients."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 4, 4)
    grads = []
    for compiled in (False, True):
        m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), sbt.SyncBatchNorm(4))
        torch.manual_seed(1)
        m[0].reset_parameters()
        if compiled:
            from torch._dynamo import compiled_autograd

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # dynamo's warning about the opaque call
                with compiled_autograd._enable(torch.compile(backend="aot_eager")):
                    y = m(x)
                    assert y.grad_fn.name() == "_SyncBatchNormFunctionBackward"
                    y.square().sum().backward()
        else:
            m(x).square().sum().backward()
        grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
