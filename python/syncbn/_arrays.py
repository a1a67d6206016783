"""What the functional API needs from an array's own framework: allocation in the same
kind, device and memory layout. Nothing else of a framework is touched."""

from __future__ import annotations

import numpy as np


def _framework(x) -> str:
    return type(x).__module__.split(".", 1)[0]


def export(x):
    """The array as the core may import it: torch tensors detached (torch refuses DLPack
    export under autograd); device arrays as DLPack capsules, which skip the
    __dlpack__(stream=None) handshake with the legacy default stream - the core runs on
    the framework's current stream anyway, and that handshake is not allowed while a
    CUDA graph is being captured."""
    if x is None:
        return x
    fw = _framework(x)
    if fw == "torch":
        x = x.detach()
        if x.is_cuda:
            from torch.utils.dlpack import to_dlpack

            return to_dlpack(x)
        return x
    if fw == "cupy":
        return x.toDlpack()
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


def is_cuda(x) -> bool:
    """Whether x lives on a CUDA device (DLPack kDLCUDA / kDLCUDAManaged)."""
    dev = getattr(x, "__dlpack_device__", None)
    return dev is not None and int(dev()[0]) in (2, 13)


def vector(n: int, like) -> object:
    """float64 zeros of length n where `like` lives: NumPy on the host; on a device an
    array of like's framework on like's device (results stay there: no host sync)."""
    if not is_cuda(like):
        return np.zeros(n, dtype=np.float64)
    fw = _framework(like)
    if fw == "torch":
        import torch

        return torch.zeros(n, dtype=torch.float64, device=like.device)
    if fw == "cupy":
        import cupy

        with like.device:
            return cupy.zeros(n, dtype=cupy.float64)
    ns = like.__array_namespace__()
    return ns.zeros(n, dtype=ns.float64, device=like.device)


def stream_of(x) -> int:
    """The caller's current CUDA stream for x's framework and device (0: the default)."""
    if not is_cuda(x):
        return 0
    fw = _framework(x)
    if fw == "torch":
        import torch

        return int(torch.cuda.current_stream(x.device).cuda_stream)
    if fw == "cupy":
        import cupy

        return int(cupy.cuda.get_current_stream().ptr)
    return 0


def channels(x, axis: int) -> int:
    """x.shape[axis] when that exists, else 0 (the core then names the real problem)."""
    shape = getattr(x, "shape", ())
    nd = len(shape)
    return int(shape[axis]) if nd >= 2 and -nd <= axis < nd else 0


def host_vector(n: int) -> np.ndarray:
    return np.zeros(n, dtype=np.float64)


def prepare(x) -> int:
    """Loads the backend x's device needs; returns the stream to run on."""
    if is_cuda(x):
        from . import _device

        _device.cuda()
        return stream_of(x)
    return 0
