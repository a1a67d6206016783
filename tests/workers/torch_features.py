"""One rank of the torch adapter's multi-rank feature checks (tests/test_torch_features.py).

Under mpiexec:  mpiexec -n N python -m mpi4py torch_features.py OUT_DIR SECTIONS
Under torchrun: torchrun --nproc_per_node=N torch_features.py OUT_DIR SECTIONS   (gloo)

SECTIONS (comma-separated), each on this rank's slice of a seeded global batch (sizes
from feature_nets.SIZES, one rank may be empty), results saved to OUT_DIR/rank{r}.pt for
the parent to compare with torch.nn.BatchNorm on the concatenated batch:
  compiled    torch.compile (default options: inductor) training of a two-branch MLP
              (BatchNorm1d; an empty rank) and a residual conv net, next to eager
              training of the same model; parameters, gradients (summed over ranks),
              buffers of both.
  autograd    double backward (a gradient penalty), batched gradients
              (is_grads_batched), forward-mode AD (torch.func.jvp) in training and eval.
  checkpoint  torch.utils.checkpoint (reentrant and not) over SyncBN layers: outputs,
              gradients, running stats, num_batches_tracked and how many collectives ran.
"""

import os
import sys

import torch
from feature_nets import LR, SIZES, STEPS, batch, make_mlp, make_resnet

import syncbn
import syncbn.torch as sbt

if "TORCHELASTIC_RUN_ID" in os.environ:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    RANK, SIZE = dist.get_rank(), dist.get_world_size()

    def allsum(t):
        dist.all_reduce(t)
else:
    from mpi4py import MPI

    RANK, SIZE = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()

    def allsum(t):
        MPI.COMM_WORLD.Allreduce(MPI.IN_PLACE, t.numpy())


def my_slice(name, step):
    sizes = (SIZES[name] * SIZE)[:SIZE]
    x, w = batch(name, step, sum(sizes))
    off = sum(sizes[:RANK])
    return x[off:off + sizes[RANK]], w[off:off + sizes[RANK]]


def train(model, name, compiled):
    fn = torch.compile(model, fullgraph=True) if compiled else model
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    grads = []
    for step in range(STEPS):
        x, w = my_slice(name, step)
        if name == "resnet":
            x = x.contiguous(memory_format=torch.channels_last)
        loss = (fn(x) * w).sum()
        opt.zero_grad()
        loss.backward()
        for p in model.parameters():
            g = p.grad.contiguous()
            allsum(g)
            p.grad.copy_(g)
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        opt.step()
    return dict(state={k: t.detach().clone() for k, t in model.state_dict().items()},
                grads=grads)


def compiled_section():
    out = {}
    for name, make in (("mlp", make_mlp), ("resnet", make_resnet)):
        for mode in ("eager", "compiled"):
            model = sbt.convert_sync_batchnorm(make())
            out[f"{name}/{mode}"] = train(model, name, mode == "compiled")
    return out


def autograd_section():
    out = {}
    # Double backward: a gradient penalty through two SyncBN layers.
    net = sbt.convert_sync_batchnorm(make_mlp())
    x, w = my_slice("mlp", 0)
    x = x.clone().requires_grad_()
    y = (net(x) * w).sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    (y + (gx ** 2).sum()).backward()
    grads = {k: p.grad.clone() for k, p in net.named_parameters()}
    for g in grads.values():
        allsum(g)
    out["double"] = dict(dx=x.grad.clone(), grads=grads)
    # Batched gradients: several vector-Jacobian products of one layer at once.
    bn = sbt.SyncBatchNorm(5, dtype=torch.float64)
    x, _ = my_slice("layer", 0)
    x = x.clone().requires_grad_()
    y = bn(x)
    v = torch.stack([w for w in (my_slice("layer", k)[1] for k in (1, 2, 3))])
    (gb,) = torch.autograd.grad(y, x, v, is_grads_batched=True)
    out["batched"] = gb
    # Forward-mode AD, training then eval (same module: eval uses the updated stats).
    bn = sbt.SyncBatchNorm(5, dtype=torch.float64)
    x, t = my_slice("layer", 4)
    y, ty = torch.func.jvp(bn, (x,), (t,))
    out["jvp_train"] = dict(y=y, t=ty, running_mean=bn.running_mean.clone(),
                            running_var=bn.running_var.clone())
    bn.eval()
    y, ty = torch.func.jvp(bn, (x,), (t,))
    out["jvp_eval"] = dict(y=y, t=ty)
    return out


class Counting:
    """The default communicator, counting the all-reduces that reach it."""

    def __init__(self):
        self.inner = syncbn.comm.default()
        self.rank, self.size, self.calls = self.inner.rank, self.inner.size, 0

    def allreduce(self, buf):
        self.calls += 1
        syncbn.allreduce(buf, self.inner)


def checkpoint_section():
    out = {}
    for reentrant in (True, False):
        comm = Counting()
        net = sbt.convert_sync_batchnorm(make_mlp(), comm=comm)
        x, w = my_slice("mlp", 5)
        x = x.clone().requires_grad_()

        h = torch.utils.checkpoint.checkpoint(net.trunk, x, use_reentrant=reentrant)
        y = net.head(h)
        first = h.detach().clone()
        fwd_calls = comm.calls
        (y * w).sum().backward()
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        for g in grads.values():
            allsum(g)
        out[f"reentrant={reentrant}"] = dict(
            h=first, dx=x.grad.clone(), grads=grads, fwd_calls=fwd_calls, calls=comm.calls,
            buffers={k: t.clone() for k, t in net.state_dict().items()})
    return out


def main(out_dir, sections):
    res = {}
    for s in sections.split(","):
        res[s] = globals()[f"{s}_section"]()
    torch.save(res, os.path.join(out_dir, f"rank{RANK}.pt"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
