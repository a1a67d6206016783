"""What the functional API needs from an array's own framework: allocation in the same
kind, device and memory layout. Nothing else of a framework is touched."""

from __future__ import annotations

import numpy as np


def _framework(x) -> str:
    return type(x).__module__.split(".", 1)[0]


def export(x):
    """The array as the core may import it (torch refuses DLPack export under autograd)."""
    if x is not None and _framework(x) == "torch":
        return x.detach()
    return x


def empty_like(x):
    """An uninitialized array of x's kind, shape, dtype, device and memory layout."""
    if isinstance(x, np.ndarray):
        return np.empty_like(x)  # order="K" keeps channels-last strides
    fw = _framework(x)
    if fw == "torch":
        import torch

        return torch.empty_like(x)  # preserve_format keeps channels_last
    if fw == "cupy":
        import cupy

        return cupy.empty_like(x)
    ns = getattr(x, "__array_namespace__", None)
    if ns is not None:
        return ns().empty_like(x)
    raise TypeError(
        f"x: expected a NumPy, PyTorch or CuPy array, or an array with __array_namespace__, "
        f"got {type(x).__name__}"
    )


def is_cpu(x) -> bool:
    dev = getattr(x, "__dlpack_device__", None)
    return dev is None or dev()[0] in (1, 3)  # kDLCPU, kDLCUDAHost


def channels(x, axis: int) -> int:
    """x.shape[axis] when that exists, else 0 (the core then names the real problem)."""
    shape = getattr(x, "shape", ())
    nd = len(shape)
    return int(shape[axis]) if nd >= 2 and -nd <= axis < nd else 0


def host_vector(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float64)
