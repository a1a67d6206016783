"""NumPy SyncBatchNorm with PyTorch's conventions (axis=1, momentum=0.1, eps=1e-5)."""

from __future__ import annotations

import numpy

from ._module import ArraySyncBatchNorm

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(ArraySyncBatchNorm):
    __doc__ = ArraySyncBatchNorm.__doc__.replace("the arrays of ``_xp`` (set by subclasses)",
                                                 "NumPy arrays")
    _xp = numpy
