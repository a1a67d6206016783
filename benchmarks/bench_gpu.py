"""GPU benchmark: syncbn's CUDA path against cuDNN batch norm and torch's own SyncBN kernel
chain, in one run, on one GPU (world size 1, local communicator: the kernels alone).

    python benchmarks/bench_gpu.py [--reps 50] [--quick] [--json PATH]

For each shape, dtype (float32, bfloat16) and layout (NCHW, NHWC = channels_last):
  fwd      training forward
  fwd+bwd  forward and backward (dx, dweight, dbias)
contenders, timed with CUDA events on the current stream, interleaved, median of reps:
  syncbn   syncbn.torch.SyncBatchNorm's functional path (batch_norm_forward/backward)
  cudnn    torch.nn.functional.batch_norm (cuDNN / native)
  chain    torch.batch_norm_stats -> batch_norm_gather_stats_with_counts ->
           batch_norm_elemt; batch_norm_backward_reduce -> batch_norm_backward_elemt
           (what torch.nn.SyncBatchNorm runs, minus its all-gather)
Bandwidth: fraction of the measured device-to-device copy bandwidth, counting 3*s bytes
per element for fwd and 8*s for fwd+bwd (s = element size). Inputs rotate among enough
copies to exceed 4x the L2 cache, so a shape that fits in L2 is timed from memory.
Targets (figures, not tests): >= 85% of copy bandwidth fwd+bwd on the large shapes,
>= 1.5x faster than torch's chain.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

import syncbn

SHAPES = [(64, 512, 56, 56), (256, 4, 224, 224), (128, 2048, 7, 7)]


def timed(fn, reps):
    """Per-rep milliseconds of fn() on the current stream (CUDA events)."""
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def copy_bandwidth(reps):
    n = 1 << 28  # 1 GiB of float32
    src = torch.empty(n, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    ms = statistics.median(timed(lambda: dst.copy_(src), reps))
    return 2 * src.numel() * 4 / (ms * 1e-3) / 1e9  # read + write


def contenders(x, w, b, rm, rv, dy):
    C = x.shape[1]
    comm = syncbn.comm.local()

    def syncbn_fwd():
        return syncbn.batch_norm_forward(x, w, b, rm, rv, comm=comm)

    def syncbn_fwd_bwd():
        _, ctx = syncbn_fwd()
        syncbn.batch_norm_backward(dy, ctx)

    def cudnn_fwd():
        return F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5)

    xg = x.detach().requires_grad_()
    wg, bg = w.detach().requires_grad_(), b.detach().requires_grad_()

    def cudnn_fwd_bwd():
        y = F.batch_norm(xg, rm, rv, wg, bg, True, 0.1, 1e-5)
        torch.autograd.grad(y, (xg, wg, bg), dy)

    counts = torch.full((1,), x.numel() // C, device="cuda", dtype=torch.float32)

    def chain_fwd():
        mean, invstd = torch.batch_norm_stats(x, 1e-5)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, mean[None], invstd[None], rm, rv, 0.1, 1e-5, counts)
        return torch.batch_norm_elemt(x, w, b, mean, invstd, 1e-5), mean, invstd

    def chain_fwd_bwd():
        _, mean, invstd = chain_fwd()
        sdy, sdyx, gw, gb = torch.batch_norm_backward_reduce(dy, x, mean, invstd, w, True,
                                                             True, True)
        torch.batch_norm_backward_elemt(dy, x, mean, invstd, w, sdy, sdyx,
                                        counts.to(torch.int32))

    return {"fwd": {"syncbn": syncbn_fwd, "cudnn": cudnn_fwd, "chain": chain_fwd},
            "fwd+bwd": {"syncbn": syncbn_fwd_bwd, "cudnn": cudnn_fwd_bwd,
                        "chain": chain_fwd_bwd}}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json")
    args = p.parse_args()
    reps = 5 if args.quick else args.reps
    assert torch.cuda.is_available(), "needs a CUDA device"
    info = syncbn.build_info()
    print(f"syncbn {info['version']} cuda={info['cuda']} archs={info['cuda_architectures']} "
          f"| torch {torch.__version__} | {torch.cuda.get_device_name()}")
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    bw = copy_bandwidth(reps)
    print(f"device-to-device copy: {bw:.0f} GB/s (read + write, 1 GiB, median of {reps})")
    rows = []
    for shape in SHAPES[:1] if args.quick else SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            for layout in ("NCHW", "NHWC"):
                g = torch.Generator(device="cuda").manual_seed(0)
                C = shape[1]
                s = torch.empty((), dtype=dtype).element_size()
                numel = shape[0] * shape[1] * shape[2] * shape[3]
                nsets = max(1, -(-4 * l2 // (2 * s * numel)))
                sets = []
                for _ in range(nsets):
                    x = torch.randn(shape, device="cuda", generator=g).to(dtype) * 2 + 1
                    dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
                    if layout == "NHWC":
                        x = x.contiguous(memory_format=torch.channels_last)
                        dy = dy.contiguous(memory_format=torch.channels_last)
                    w, b = torch.rand(C, device="cuda") + 0.5, torch.rand(C, device="cuda")
                    rm, rv = torch.zeros(C, device="cuda"), torch.ones(C, device="cuda")
                    sets.append(contenders(x, w, b, rm, rv, dy))
                for op in ("fwd", "fwd+bwd"):
                    names = list(sets[0][op])
                    for fns in sets:  # warm up (allocator, cuDNN plans)
                        for fn in fns[op].values():
                            fn()
                    times = {k: [] for k in names}
                    for r in range(reps):  # interleaved, rotating the input sets
                        for k in names:
                            times[k] += timed(sets[r % nsets][op][k], 1)
                    med = {k: statistics.median(v) for k, v in times.items()}
                    nbytes = (3 if op == "fwd" else 8) * s * numel
                    frac = nbytes / (med["syncbn"] * 1e-3) / 1e9 / bw
                    q = {k: statistics.quantiles(v, n=4) if len(v) > 1 else v * 3
                         for k, v in times.items()}
                    row = dict(shape=shape, dtype=str(dtype), layout=layout, op=op,
                               ms=med, ms_q1_q3={k: (v[0], v[2]) for k, v in q.items()},
                               input_sets=nsets, bw_fraction=frac,
                               vs_cudnn=med["syncbn"] / med["cudnn"],
                               vs_chain=med["syncbn"] / med["chain"])
                    rows.append(row)
                    print(f"{str(shape):20s} {str(dtype)[6:]:9s} {layout} {op:8s} "
                          f"syncbn {med['syncbn']:.3f} ms  cudnn {med['cudnn']:.3f}  "
                          f"chain {med['chain']:.3f}  | x cudnn {row['vs_cudnn']:.2f}  "
                          f"x chain {row['vs_chain']:.2f}  bw {frac:.0%}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(copy_GBps=bw, rows=rows, info=info), f, indent=1, default=str)


if __name__ == "__main__":
    main()
