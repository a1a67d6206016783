"""CuPy SyncBatchNorm: the interface of syncbn.numpy.SyncBatchNorm on CUDA arrays.

Runs on CuPy's current stream; with ``comm=syncbn.comm.nccl()`` nothing is read back to
the host (CUDA-graph capturable); other communicators stage the 2C+1 values through
host memory.
"""

from __future__ import annotations

import cupy

from ._module import ArraySyncBatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(ArraySyncBatchNorm):
    __doc__ = ArraySyncBatchNorm.__doc__.replace("the arrays of ``_xp`` (set by subclasses)",
                                                 "CuPy arrays (on the current device)")
    _xp = cupy
