"""What the functional API needs from an array's own framework: allocation in the same
kind, device and memory layout. Nothing else of a framework is touched."""

from __future__ import annotations

import numpy as np

_FRAMEWORK: dict = {}  # type -> top-level module name, looked up once per type


def _framework(x) -> str:
    t = type(x)
    fw = _FRAMEWORK.get(t)
    if fw is None:
        fw = _FRAMEWORK[t] = t.__module__.split(".", 1)[0]
    return fw


_torch = None  # (torch.strided, to_dlpack) once torch is seen


def _torch_parts():
    global _torch
    if _torch is None:
        import torch
        from torch.utils.dlpack import to_dlpack

        _torch = (torch.strided, to_dlpack)
    return _torch


def export(x, name="x"):
    """The array as the core may import it (``name``: the argument, for errors). Torch
    tensors go as DLPack capsules from
    torch.utils.dlpack.to_dlpack: it takes tensors under autograd (Tensor.__dlpack__
    refuses them), costs a tenth of __dlpack__, and on CUDA it skips the
    __dlpack__(stream=None) handshake with the legacy default stream - the core runs on
    torch's current stream anyway, and that handshake is not allowed while a CUDA graph
    is being captured. CuPy arrays do the DLPack handshake naming the stream the core
    runs on (CuPy's current one), so CuPy orders nothing (capturable as well)."""
    if x is None:
        return x
    fw = _framework(x)
    if fw == "torch":
        strided, to_dlpack = _torch_parts()
        if x.layout is not strided or x.is_meta:
            what = "a meta tensor" if x.is_meta else f"a tensor of layout {x.layout}"
            raise TypeError(f"{name}: expected a strided tensor with data (CPU or CUDA), got "
                            f"{what}" + ("" if x.is_meta else "; call .to_dense() first"))
        return to_dlpack(x)
    if fw == "numpy" and isinstance(x, np.ndarray) and not x.dtype.isnative:
        raise TypeError(f"{name}: expected an array in native byte order, got {x.dtype.str} "
                        f"({'big' if x.dtype.byteorder == '>' else 'little'}-endian); convert "
                        f"it with x.astype(x.dtype.newbyteorder('='))")
    if fw == "cupy":
        # 1 is the legacy default stream; ndarray.toDlpack is deprecated (warns each call).
        s = stream_of(x)
        return x.__dlpack__(stream=s if s else 1)
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

        with x.device:  # CuPy allocates on the current device, not x's
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
    if isinstance(x, np.ndarray):
        return False
    if _framework(x) == "torch":
        return x.is_cuda
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

        with x.device:  # each device has its own current stream
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
