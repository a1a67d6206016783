"""One rank of the torch adapter's training equivalence (tests/test_torch_adapter.py).

Under mpiexec:  mpiexec -n N python -m mpi4py torch_train.py OUT_DIR mpi
Under torchrun: torchrun --nproc_per_node=N torch_train.py OUT_DIR ddp

Each variant: the same seeded net, converted to syncbn.torch.SyncBatchNorm, trained for
STEPS SGD steps on this rank's slice of the global batch. `mpi`: default communicator
(MPI.COMM_WORLD), gradients summed with mpi4py. `ddp`: gloo process group, the
torch_distributed communicator and DistributedDataParallel. Saves parameters, buffers,
an eval output, and a bf16/fp16 layer check to OUT_DIR/rank{r}.pt.
"""

import os
import sys

import torch
from torch_nets import LR, STEPS, VARIANTS, batch, make_net

import syncbn
import syncbn.torch as sbt


def main(out_dir, mode):
    if mode == "ddp":
        import torch.distributed as dist

        dist.init_process_group("gloo")
        rank, size = dist.get_rank(), dist.get_world_size()
        comm = syncbn.comm.torch_distributed()
    else:
        from mpi4py import MPI

        world = MPI.COMM_WORLD
        rank, size = world.Get_rank(), world.Get_size()
        comm = None  # the default: MPI.COMM_WORLD under mpiexec
        assert syncbn.comm.default().kind == "mpi"

    results = {}
    for name, v in VARIANTS.items():
        sizes = (v["sizes"] * size)[:size]
        off, n = sum(sizes[:rank]), sizes[rank]
        dtype = getattr(torch, v.get("dtype", "float64"))
        net = sbt.convert_sync_batchnorm(make_net(v["dim"], dtype, **v.get("bn", {})), comm)
        assert sum(isinstance(m, sbt.SyncBatchNorm) for m in net.modules()) == 2
        if v.get("channels_last"):
            net = net.to(memory_format=torch.channels_last)
        model = net
        if mode == "ddp":
            model = torch.nn.parallel.DistributedDataParallel(net)
        opt = torch.optim.SGD(net.parameters(), lr=LR)
        for step in range(STEPS):
            x, w = batch(step, sum(sizes), v["dim"], dtype)
            x, w = x[off:off + n], w[off:off + n]
            if v.get("channels_last"):
                x = x.contiguous(memory_format=torch.channels_last)
            out = model(x)
            if v.get("channels_last"):
                assert out.is_contiguous(memory_format=torch.channels_last)
            loss = (out * w).sum()
            if mode == "ddp":
                loss = loss * size  # DDP averages gradients; the reference sums
            opt.zero_grad()
            loss.backward()
            if mode == "mpi":
                for p in net.parameters():
                    g = p.grad.contiguous()  # channels_last conv grads are strided
                    world.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
                    p.grad.copy_(g)
            opt.step()
        net.eval()
        xe, _ = batch(99, 4, v["dim"], dtype)
        with torch.no_grad():
            ye = net(xe)
        state = {k: t.detach().clone() for k, t in net.state_dict().items()}
        results[name] = dict(state=state, eval_out=ye)

    # 16-bit inputs with float32 parameters: one SyncBatchNorm layer, forward + backward.
    for dt in ("bfloat16", "float16"):
        sizes = ([3, 0, 2, 4] * size)[:size]
        g = torch.Generator().manual_seed(7)
        X = (torch.randn((sum(sizes), 4, 50), generator=g) * 3 + 5).to(getattr(torch, dt))
        DY = torch.randn((sum(sizes), 4, 50), generator=g).to(getattr(torch, dt))
        off, n = sum(sizes[:rank]), sizes[rank]
        bn = sbt.SyncBatchNorm(4, comm=comm)
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5, generator=g)
            bn.bias.uniform_(-0.5, 0.5, generator=g)
        x = X[off:off + n].clone().requires_grad_()
        y = bn(x)
        y.backward(DY[off:off + n])
        assert y.dtype == x.dtype and x.grad.dtype == x.dtype
        assert bn.weight.grad.dtype == torch.float32
        results[dt] = dict(y=y.detach(), dx=x.grad, dw=bn.weight.grad, db=bn.bias.grad,
                           running_mean=bn.running_mean, running_var=bn.running_var,
                           sizes=sizes)
    results["native"] = sbt._native is not None  # the C++ autograd node ran the eager path
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    if mode == "ddp":
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
