"""Puts syncbn's SyncBatchNorm where PyTorch's own tests look for torch's batch norm classes.

PyTorch's BatchNorm tests name their subject as ``nn.BatchNorm1d``/``2d``/``3d`` (test_nn.py),
``module_db`` entries' ``module_cls`` (test_modules.py) and ``nn.SyncBatchNorm`` (test_nn.py,
distributed_test.py). ``swap()`` replaces those names with syncbn classes for the duration of a
run; every construction is counted, so a run can prove that the class under test was syncbn's
(a harness that silently runs torch's own class would pass for the wrong reason).

The 1d/2d/3d classes add exactly what ``torch.nn.BatchNorm1d/2d/3d`` add to ``_BatchNorm``:
the input-rank check (torch's tests check that error) and torch's constructor signature (no
``process_group`` between ``track_running_stats`` and ``device``).
"""

from __future__ import annotations

import contextlib

import torch

import syncbn.torch as sbt

TORCH_BATCHNORM = {1: torch.nn.BatchNorm1d, 2: torch.nn.BatchNorm2d, 3: torch.nn.BatchNorm3d}
TORCH_SYNC = torch.nn.SyncBatchNorm

constructions = {"count": 0}


# Stands for torch.nn.SyncBatchNorm as it is: torch's own isinstance checks against that name
# (DDP's has_sync_bn) must see the layers that convert_sync_batchnorm makes.
SyncBatchNorm = sbt.SyncBatchNorm


def _make(dim: int):
    torch_cls = TORCH_BATCHNORM[dim]

    class Cls(sbt.SyncBatchNorm):
        __doc__ = (f"syncbn's SyncBatchNorm with torch.nn.{torch_cls.__name__}'s signature "
                   "and input-rank check.")

        def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                     track_running_stats=True, device=None, dtype=None, *, bias=True):
            super().__init__(num_features, eps, momentum, affine, track_running_stats,
                             device=device, dtype=dtype, bias=bias)

        _check_input_dim = torch_cls._check_input_dim

    Cls.__name__ = Cls.__qualname__ = f"SyncBatchNorm{dim}d"
    return Cls


SyncBatchNorm1d, SyncBatchNorm2d, SyncBatchNorm3d = _make(1), _make(2), _make(3)
OURS = {1: SyncBatchNorm1d, 2: SyncBatchNorm2d, 3: SyncBatchNorm3d}


def _set(obj, name, value, undo):
    undo.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


@contextlib.contextmanager
def swap(batchnorm: bool = True, sync: bool = True, module_db: bool = False):
    """Within the block: ``torch.nn.BatchNorm{1,2,3}d`` are syncbn's (``batchnorm``),
    ``torch.nn.SyncBatchNorm`` is syncbn's (``sync``), and the BatchNorm entries of
    ``common_modules.module_db`` construct syncbn's classes under torch's test names
    (``module_db``). Names are restored on exit. Import test modules inside the block:
    decorators such as ``parametrize`` capture the classes at import time."""
    undo = []
    try:
        # Count every syncbn module built (convert_sync_batchnorm's too).
        init = sbt.SyncBatchNorm.__init__

        def counted_init(self, *args, **kwargs):
            init(self, *args, **kwargs)
            constructions["count"] += 1

        _set(sbt.SyncBatchNorm, "__init__", counted_init, undo)
        if batchnorm:
            for dim, cls in OURS.items():
                name = TORCH_BATCHNORM[dim].__name__
                for ns in (torch.nn, torch.nn.modules, torch.nn.modules.batchnorm):
                    _set(ns, name, cls, undo)
        if sync:
            for ns in (torch.nn, torch.nn.modules, torch.nn.modules.batchnorm):
                _set(ns, "SyncBatchNorm", SyncBatchNorm, undo)
        if module_db:
            from torch.testing._internal import common_modules as cm

            for info in cm.module_db:
                for dim, torch_cls in TORCH_BATCHNORM.items():
                    if info.module_cls is torch_cls:
                        _set(info, "module_cls", OURS[dim], undo)
                        # Same test names as with torch's class ("nn.BatchNorm2d"), so a
                        # result can be put beside the baseline's.
                        cm.MODULE_CLASS_NAMES[OURS[dim]] = cm.MODULE_CLASS_NAMES[torch_cls]
        yield
    finally:
        for obj, name, value in reversed(undo):
            setattr(obj, name, value)
