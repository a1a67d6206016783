"""One rank of a multi-rank equivalence case (see tests/test_mpi_equivalence.py).

Usage: mpiexec -n N python -m mpi4py equivalence.py CASE.json OUT_DIR

Each rank takes its slice of the global batch (sizes from the case, possibly 0), puts
it in the case's dtype and memory layout, runs `steps` training forward/backward steps
through the public API, and saves what it got as float64 to OUT_DIR/rank{r}.npz. The
parent test compares against a float64 reference on the concatenated batch.
"""

import json
import sys

import numpy as np
from mpi4py import MPI

import syncbn


class CountingComm:
    """A user-defined communicator (rank, size, allreduce(buf)) that records payloads."""

    def __init__(self, comm):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.payloads = []

    def allreduce(self, buf):
        self.payloads.append(int(buf.size))
        self.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def to_layout(a, dtype, layout, axis):
    """a: float64 logical array -> the case's kind, dtype and memory layout."""
    if dtype == "bfloat16" or layout.startswith("torch"):
        import torch

        t = torch.from_numpy(np.ascontiguousarray(a)).to(getattr(torch, dtype))
        if layout == "torch_cuda":  # device buffers: ranks share the one GPU
            return t.cuda()
        if layout == "torch_channels_last":
            t = t.contiguous(memory_format=torch.channels_last if t.dim() == 4
                             else torch.channels_last_3d)
        return t
    a = a.astype(dtype)
    if layout == "contiguous":
        return np.ascontiguousarray(a)
    if layout == "channels_last":  # logical channel at `axis`, stride 1 in memory
        return np.moveaxis(np.ascontiguousarray(np.moveaxis(a, axis, -1)), -1, axis)
    if layout == "strided":  # every other element of a wider buffer, reversed batch axis
        buf = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype)
        buf[..., ::2] = a[::-1]
        return buf[..., ::2][::-1]
    if layout == "fortran":
        return np.asfortranarray(a)
    raise ValueError(layout)


def to_f64(a):
    if a is None:
        return np.zeros(0)
    if type(a).__module__.startswith("torch"):
        return a.detach().double().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def main(case_path, out_dir):
    case = json.load(open(case_path))
    data = np.load(case["data"])
    world = MPI.COMM_WORLD
    r = world.Get_rank()
    sizes = case["sizes"]
    assert len(sizes) == world.Get_size(), (sizes, world.Get_size())
    off, n = sum(sizes[:r]), sizes[r]
    axis, dtype, layout = case["axis"], case["dtype"], case["layout"]

    kind = case.get("comm", "mpi")
    if kind == "split":  # two groups normalized independently: even and odd ranks
        sub = world.Split(color=r % 2, key=r)
        comm = syncbn.comm.mpi(sub)
    elif kind == "syncbn_split":  # the same groups through syncbn.comm.split; keys reversed
        comm = syncbn.comm.split(syncbn.comm.mpi(world), r % 2, key=-r)
        assert comm.size == len(range(r % 2, world.Get_size(), 2)), comm
    elif kind == "counting":
        comm = CountingComm(world)
    else:
        comm = syncbn.comm.mpi(world)

    pdtype = "float64" if dtype == "float64" else "float32"
    # 1-D parameters: on the GPU with device inputs, torch for bf16, else NumPy.
    plain = ("torch_cuda" if layout == "torch_cuda"
             else "torch" if dtype == "bfloat16" else "contiguous")
    weight = to_layout(data["weight"], pdtype, plain, 0) if case.get("affine", True) else None
    bias = to_layout(data["bias"], pdtype, plain, 0) if case.get("affine", True) else None
    C = data["weight"].shape[0]
    rm = to_layout(np.zeros(C), pdtype, plain, 0)
    rv = to_layout(np.ones(C), pdtype, plain, 0)

    out = {}
    for s in range(case["steps"]):
        x = to_layout(data[f"x{s}"][off:off + n], dtype, layout, axis)
        dy = to_layout(data[f"dy{s}"][off:off + n], dtype,
                       case.get("dy_layout", layout), axis)
        out[f"xin{s}"] = to_f64(x)  # the rounded values this rank really used
        out[f"dyin{s}"] = to_f64(dy)
        before = len(comm.payloads) if kind == "counting" else 0
        try:
            y, ctx = syncbn.batch_norm_forward(x, weight, bias, rm, rv, training=True,
                                               momentum=case["momentum"], eps=case["eps"],
                                               axis=axis, comm=comm)
        except ValueError as e:
            out["error"] = np.array(str(e))
            break
        mid = len(comm.payloads) if kind == "counting" else 0
        dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
        if kind == "counting":
            out[f"fwd_payloads{s}"] = np.array(comm.payloads[before:mid], dtype=np.int64)
            out[f"bwd_payloads{s}"] = np.array(comm.payloads[mid:], dtype=np.int64)
        assert type(y) is type(x) and type(dx) is type(x), (type(x), type(y), type(dx))
        if isinstance(x, np.ndarray):
            out[f"same_strides{s}"] = np.array(y.strides == x.strides or x.size == 0)
        elif hasattr(x, "stride"):
            out[f"same_strides{s}"] = np.array(y.stride() == x.stride() or x.numel() == 0)
        out[f"y{s}"], out[f"dx{s}"] = to_f64(y), to_f64(dx)
        out[f"dw{s}"], out[f"db{s}"] = to_f64(dw), to_f64(db)
    out["running_mean"], out["running_var"] = to_f64(rm), to_f64(rv)
    np.savez(f"{out_dir}/rank{r}.npz", **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
