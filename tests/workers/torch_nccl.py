"""GPU worker, run by tests/test_cuda.py under `torchrun --standalone --nproc_per_node=1`:
an NCCL process group of one rank, passed every way a user can pass it, must give the
plain batch norm of the batch, and CUDA inputs must get syncbn's NCCL communicator (one
per group and device, shared by all layers) rather than host staging."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

import syncbn
import syncbn.torch as sbt


def main():
    dist.init_process_group("nccl")
    dev = torch.device("cuda", 0)
    torch.cuda.set_device(dev)
    pg = dist.new_group([0])
    x = torch.randn(8, 4, 5, 5, device=dev, dtype=torch.float64) * 2 + 1
    ref = F.batch_norm(x, None, None, training=True)

    kinds = {}
    for name, comm in [("default", None), ("group", pg), ("world", dist.group.WORLD),
                       ("torch_distributed", syncbn.comm.torch_distributed(pg)),
                       ("nccl", syncbn.comm.nccl(group=pg))]:
        y, ctx = syncbn.batch_norm_forward(x, comm=comm)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        kinds[name] = ctx.comm.kind
    # A group passed as is (or the default) becomes NCCL for CUDA inputs; an explicit
    # torch_distributed communicator keeps torch's all_reduce (host buffer staged on GPU).
    assert kinds == dict(default="nccl", group="nccl", world="nccl", torch_distributed="python",
                         nccl="nccl"), kinds
    assert syncbn.comm.as_communicator(pg, like=x) is syncbn.comm.as_communicator(pg, like=x)

    # CPU tensors on an NCCL group: summed through a CUDA tensor.
    y, _ = syncbn.batch_norm_forward(x.cpu(), comm=syncbn.comm.torch_distributed(pg))
    torch.testing.assert_close(y, ref.cpu(), rtol=1e-10, atol=1e-10)

    # Layers built with process_group share one NCCL communicator.
    net = torch.nn.Sequential(sbt.SyncBatchNorm(4, process_group=pg),
                              sbt.SyncBatchNorm(4, process_group=pg)).to(dev).double()
    xg = x.clone().requires_grad_()
    gw = torch.randn_like(x)  # a loss whose gradient is far from zero
    (net(xg) * gw).square().sum().backward()
    comms = [m.communicator(x) for m in net]
    assert comms[0] is comms[1] and comms[0].kind == "nccl", comms
    xr = x.clone().requires_grad_()
    (F.batch_norm(F.batch_norm(xr, None, None, training=True), None, None, training=True)
     * gw).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-8, atol=1e-8)
    dist.destroy_process_group()
    print("OK torch_nccl", kinds)


if __name__ == "__main__":
    main()
