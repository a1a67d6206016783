"""syncbn: synchronized batch normalization over DLPack arrays.

In training every rank normalizes with the mean and variance of the global batch (all
ranks together); gradients equal plain batch norm's on the concatenated batch.
"""

from __future__ import annotations

from . import _core, comm
from .functional import (
    BatchNormContext,
    CollectiveMismatchError,
    allreduce,
    batch_norm_backward,
    batch_norm_backward_elemt,
    batch_norm_backward_reduce,
    batch_norm_elemt,
    batch_norm_forward,
    batch_norm_gather_stats,
    batch_norm_stats,
    fingerprint_enabled,
    new_layer_id,
    set_fingerprint,
    stats_buffer_size,
)

__version__ = _core.build_info()["version"]

__all__ = [
    "BatchNormContext",
    "CollectiveMismatchError",
    "allreduce",
    "batch_norm_backward",
    "batch_norm_backward_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_elemt",
    "batch_norm_forward",
    "batch_norm_gather_stats",
    "batch_norm_stats",
    "build_info",
    "comm",
    "fingerprint_enabled",
    "new_layer_id",
    "set_fingerprint",
    "stats_buffer_size",
]


def build_info() -> dict:
    """What this build has: version, mpi (and the MPI library version), openmp, threads
    (SYNCBN_NUM_THREADS or the CPUs this process may use), compiler; cuda (whether the
    CUDA module was built), cuda_devices (visible now), cuda_runtime, cuda_architectures,
    nccl, nccl_version."""
    from . import _device

    info = dict(_core.build_info())
    info.update(_device.info())
    return info


def __getattr__(name):
    # Adapters are imported on first use so `import syncbn` stays light.
    if name in ("numpy", "cupy", "torch", "keras", "jax", "flax"):
        import importlib

        return importlib.import_module("." + name, __name__)
    raise AttributeError(f"module 'syncbn' has no attribute {name!r}")
