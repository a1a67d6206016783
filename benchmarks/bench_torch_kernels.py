"""The core's kernels against ATen's on ResNet-18's small BatchNorm inputs, without modules
or autograd: syncbn.batch_norm_forward / batch_norm_backward (local communicator) against
aten::native_batch_norm / native_batch_norm_backward on the same float32 tensors, NCHW and
channels_last. 41 interleaved repetitions of 50 calls each, medians; ratio syncbn / torch.

    .venv/bin/python benchmarks/bench_torch_kernels.py
"""

from __future__ import annotations

import statistics
import time

import torch

import syncbn

SHAPES = [(8, 128, 12, 12), (8, 256, 6, 6), (8, 512, 3, 3)]


def case(shape, fmt, comm) -> dict:
    """Median us per call of each function, 41 interleaved repetitions of 50 calls."""
    C = shape[1]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    dy = torch.randn(shape, generator=g).contiguous(memory_format=fmt)
    w, b, rm, rv = torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)
    _, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
    _, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, comm=comm)
    fns = {
        "torch fwd": lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5),
        "syncbn fwd": lambda: syncbn.batch_norm_forward(x, w, b, rm, rv, comm=comm),
        "torch bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True]),
        "syncbn bwd": lambda: syncbn.batch_norm_backward(dy, ctx),
    }
    ts = {k: [] for k in fns}
    for _ in range(41):
        for k, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(50):
                f()
            ts[k].append((time.perf_counter() - t0) / 50)
    return {k: statistics.median(v) * 1e6 for k, v in ts.items()}


def main() -> None:
    comm = syncbn.comm.local()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; syncbn "
          f"{syncbn.build_info()['threads']} threads; us per call (syncbn / torch = ratio)")
    for shape in SHAPES:
        for fmt in (torch.contiguous_format, torch.channels_last):
            m = case(shape, fmt, comm)
            name = "channels_last" if fmt is torch.channels_last else "NCHW"
            print(f"{name:13s} {str(shape):16s} fwd {m['syncbn fwd']:6.0f} / {m['torch fwd']:6.0f}"
                  f" = {m['syncbn fwd'] / m['torch fwd']:.2f}   bwd {m['syncbn bwd']:6.0f} / "
                  f"{m['torch bwd']:6.0f} = {m['syncbn bwd'] / m['torch bwd']:.2f}")


if __name__ == "__main__":
    main()
