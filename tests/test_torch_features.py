"""The torch adapter under the compiler, the transforms of torch.autograd/torch.func and
activation checkpointing, across real ranks (DESIGN.md: "Compiled graphs", and the
equivalence contract): every figure equals torch.nn.BatchNorm on the concatenated batch in
float64. One launch per launcher runs every section (tests/workers/torch_features.py)."""

from __future__ import annotations

import sys

import pytest
import torch

from conftest import WORKERS, run_mpi, run_torchrun

sys.path.insert(0, str(WORKERS))
from feature_nets import LR, SIZES, STEPS, batch, make_mlp, make_resnet  # noqa: E402

TOL = dict(rtol=1e-9, atol=1e-9)
LAUNCHES = {"mpiexec-3": (run_mpi, 3), "torchrun-gloo-2": (run_torchrun, 2)}


@pytest.fixture(scope="module", params=list(LAUNCHES))
def results(request, tmp_path_factory):
    launch, n = LAUNCHES[request.param]
    out = tmp_path_factory.mktemp(request.param)
    launch(n, WORKERS / "torch_features.py", out, "compiled,autograd,checkpoint", timeout=600)
    return n, [torch.load(out / f"rank{r}.pt") for r in range(n)]


def sizes(name, n):
    return (SIZES[name] * n)[:n]


def slices(name, n):
    s = sizes(name, n)
    offs = [sum(s[:r]) for r in range(n + 1)]
    return [slice(offs[r], offs[r + 1]) for r in range(n)]


def reference_training(name, make, n):
    model = make()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for step in range(STEPS):
        x, w = batch(name, step, sum(sizes(name, n)))
        loss = (model(x) * w).sum()
        opt.zero_grad()
        loss.backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return model.state_dict(), grads


@pytest.mark.parametrize("name,make", [("mlp", make_mlp), ("resnet", make_resnet)])
def test_compiled_training_equals_eager_and_the_reference(results, name, make):
    """Inductor with default options, fullgraph: the two-branch MLP has an empty rank
    (its collectives would be reordered on that rank alone without the ordering token),
    the residual conv net channels_last inputs and uneven ranks."""
    n, res = results
    state, grads = reference_training(name, make, n)
    for r in range(n):
        for mode in ("eager", "compiled"):
            got = res[r]["compiled"][f"{name}/{mode}"]
            for k, t in state.items():
                torch.testing.assert_close(got["state"][k].double(), t.double(), **TOL,
                                           msg=lambda m, k=k, mode=mode, r=r:
                                           f"{mode} rank {r} {k}: {m}")
            for step in range(STEPS):
                for k, g in grads[step].items():
                    torch.testing.assert_close(got["grads"][step][k], g, **TOL)


def test_double_backward_equals_batchnorm_on_the_concatenated_batch(results):
    """A gradient penalty: the second-order gradient synchronizes too."""
    n, res = results
    net = make_mlp()
    x, w = batch("mlp", 0, sum(sizes("mlp", n)))
    x.requires_grad_()
    y = (net(x) * w).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    (y + (gx ** 2).sum()).backward()
    for r, sl in enumerate(slices("mlp", n)):
        got = res[r]["autograd"]["double"]
        torch.testing.assert_close(got["dx"], x.grad[sl], **TOL)
        for k, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, **TOL)


def test_batched_gradients_and_forward_mode_ad_equal_batchnorm(results):
    n, res = results
    total = sum(sizes("layer", n))
    x, _ = batch("layer", 0, total)
    x.requires_grad_()
    bn = torch.nn.BatchNorm1d(5, dtype=torch.float64)
    y = bn(x)
    v = torch.stack([batch("layer", k, total)[1] for k in (1, 2, 3)])
    (gb,) = torch.autograd.grad(y, x, v, is_grads_batched=True)
    x4, t4 = batch("layer", 4, total)
    bn = torch.nn.BatchNorm1d(5, dtype=torch.float64)
    y_ref = bn(x4)  # the running stats a training step leaves
    _, t_ref = torch.func.jvp(
        lambda z: torch.nn.functional.batch_norm(z, None, None, training=True), (x4,), (t4,))
    bn.eval()
    ye_ref, te_ref = torch.func.jvp(bn, (x4,), (t4,))
    for r, sl in enumerate(slices("layer", n)):
        got = res[r]["autograd"]
        torch.testing.assert_close(got["batched"], gb[:, sl], **TOL)
        torch.testing.assert_close(got["jvp_train"]["y"], y_ref[sl].detach(), **TOL)
        torch.testing.assert_close(got["jvp_train"]["t"], t_ref[sl], **TOL)
        torch.testing.assert_close(got["jvp_train"]["running_mean"], bn.running_mean, **TOL)
        torch.testing.assert_close(got["jvp_train"]["running_var"], bn.running_var, **TOL)
        torch.testing.assert_close(got["jvp_eval"]["y"], ye_ref[sl], **TOL)
        torch.testing.assert_close(got["jvp_eval"]["t"], te_ref[sl], **TOL)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpoint_recomputation_reuses_the_statistics_and_sends_nothing(results, reentrant):
    """The recomputed forward gives the first forward's output, the running stats and
    num_batches_tracked move once, and only the four forwards and four backwards of the
    step communicate (the recomputation of the trunk's layer does not)."""
    n, res = results
    net = make_mlp()
    x, w = batch("mlp", 5, sum(sizes("mlp", n)))
    x.requires_grad_()
    h = net.trunk(x)
    (net.head(h) * w).sum().backward()
    for r, sl in enumerate(slices("mlp", n)):
        got = res[r]["checkpoint"][f"reentrant={reentrant}"]
        torch.testing.assert_close(got["h"], h[sl].detach(), **TOL)
        torch.testing.assert_close(got["dx"], x.grad[sl], **TOL)
        for k, p in net.named_parameters():
            torch.testing.assert_close(got["grads"][k], p.grad, **TOL)
        for k, t in net.state_dict().items():
            torch.testing.assert_close(got["buffers"][k], t, **TOL)
        assert got["fwd_calls"] == 4 and got["calls"] == 8, got
