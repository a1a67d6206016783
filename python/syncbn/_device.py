"""Loads the CUDA backend on first use (so `import syncbn` never needs a GPU)."""

from __future__ import annotations

from . import _core

_cuda = None


def cuda():
    """The syncbn._cuda module, registered with the core. Raises a clear error when this
    build has none."""
    global _cuda
    if _cuda is None:
        try:
            from . import _cuda as mod
        except ImportError as e:
            raise RuntimeError(
                "syncbn: CUDA arrays need syncbn's CUDA module, and this build has none "
                "(built without nvcc or with SYNCBN_WITH_CUDA=OFF; see syncbn.build_info()). "
                "Reinstall on a machine with the CUDA toolkit: pip install -e '.[cuda]'"
            ) from e
        _core.register_device_backend(mod.backend())
        _cuda = mod
    return _cuda


def info() -> dict:
    """What the CUDA side of this build has: module, devices, runtime, NCCL."""
    try:
        from . import _cuda as mod
    except ImportError:
        return dict(cuda=False, cuda_devices=0, cuda_runtime=None, cuda_architectures=None,
                    nccl=False, nccl_version=None)
    return dict(cuda=True, cuda_devices=mod.device_count(), cuda_runtime=mod.runtime_version(),
                cuda_architectures=mod.architectures, nccl=bool(mod.nccl),
                nccl_version=mod.nccl_version() if mod.nccl else None)
