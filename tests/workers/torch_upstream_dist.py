"""One rank of PyTorch's own SyncBatchNorm tests (torch/testing/_internal/distributed/
distributed_test.py, shipped in the torch wheel) on gloo and the CPU (tests/test_torch_upstream.py).

    torchrun --nproc_per_node=2 torch_upstream_dist.py OUT.json ours|torch [TEST ...]

Every test of ``DistributedTest._DistTestBase`` whose body uses ``SyncBatchNorm`` runs as
PyTorch wrote it (its assertions and tolerances), with ``torch.nn.SyncBatchNorm`` swapped for
syncbn's (``ours``) or left as it is (``torch``, the baseline). PyTorch marks all but one of
them GPU-only; they run here on the CPU because the placement calls are made CPU no-ops for
the run: ``Tensor.cuda``/``Module.cuda``/``torch.cuda.set_device``/``current_device``, a
CUDA ``device=`` of ``torch.randn``, and DDP's ``device_ids``/``output_device`` (which DDP
only accepts for GPU modules). The GPU-count skip decorators are unwrapped (``__wrapped__``);
``unittest.skip`` markers are kept. ``_barrier`` is ``dist.barrier()`` (PyTorch's file-based
Barrier needs its spawn harness's temp dirs). Rank 0 writes {test: {outcome, reason, built}}.
"""

import datetime
import faulthandler
import inspect
import json
import os
import sys
import traceback
import unittest
from pathlib import Path

os.environ.setdefault("BACKEND", "gloo")  # read by distributed_test at import
os.environ.setdefault("INIT_METHOD", "env://")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "torch_upstream"))
import swap  # noqa: E402


def cpu_placement():
    """Makes PyTorch's GPU placement calls no-ops on the CPU (see the module docstring)."""
    torch.Tensor.cuda = lambda self, *a, **k: self
    torch.nn.Module.cuda = lambda self, *a, **k: self
    torch.cuda.set_device = lambda *a, **k: None
    torch.cuda.current_device = lambda: 0
    randn = torch.randn

    def cpu_randn(*args, device=None, **kwargs):
        if device is not None and torch.device(device).type != "cpu":
            device = "cpu"
        return randn(*args, device=device, **kwargs)

    torch.randn = cpu_randn
    ddp = torch.nn.parallel.DistributedDataParallel
    init = ddp.__init__

    def cpu_init(self, module, device_ids=None, output_device=None, *args, **kwargs):
        init(self, module, None, None, *args, **kwargs)

    ddp.__init__ = cpu_init


def unwrap(fn):
    while hasattr(fn, "__wrapped__"):
        fn = fn.__wrapped__
    return fn


def main(out, mode, names):
    # An abort then shows which test and Python line it came from (seen 3 times in about
    # 40 runs on 2026-11-29, all within 10 minutes: "terminate called without an active
    # exception" on one rank, 5 s in, no Python traceback).
    faulthandler.enable(all_threads=True)
    # A failing rank must not leave its peer blocked for gloo's default 30 minutes.
    dist.init_process_group("gloo", timeout=datetime.timedelta(
        seconds=int(os.environ.get("UPSTREAM_PG_TIMEOUT", "120"))))
    rank = dist.get_rank()
    cpu_placement()
    from torch.testing._internal.common_utils import TestCase
    from torch.testing._internal.distributed.distributed_test import DistributedTest

    base = DistributedTest._DistTestBase

    class Case(base, TestCase):
        def _barrier(self, *args, **kwargs):
            dist.barrier()

        def runTest(self):
            pass

    if not names:
        names = sorted(n for n, f in vars(base).items()
                       if n.startswith("test_") and callable(f)
                       and "SyncBatchNorm" in inspect.getsource(unwrap(f)))
    results = {}
    ctx = swap.swap(batchnorm=False, sync=True) if mode == "ours" else None
    if ctx is not None:
        ctx.__enter__()
        assert torch.nn.SyncBatchNorm is swap.SyncBatchNorm
    try:
        for name in names:
            fn = vars(base)[name]
            before = swap.constructions["count"]
            if getattr(fn, "__unittest_skip__", False):
                rec = {"outcome": "skipped", "reason": fn.__unittest_skip_why__}
            else:
                case = Case()
                case.rank = rank
                try:
                    case.setUp()  # TestCase's: seeds every rank alike, as PyTorch's harness
                    try:
                        unwrap(fn)(case)
                    finally:
                        case.tearDown()
                    rec = {"outcome": "passed"}
                except unittest.SkipTest as e:
                    rec = {"outcome": "skipped", "reason": str(e)}
                except Exception as e:  # noqa: BLE001 - a test's failure is a result
                    rec = {"outcome": "failed", "reason": f"{type(e).__name__}: {e}"[:600],
                           "traceback": traceback.format_exc()[-2000:]}
            rec["built"] = swap.constructions["count"] - before
            results[name] = rec
            # A failure on one rank may leave the others waiting in a collective; a
            # barrier with a timeout would hide nothing, so keep every rank in step.
            dist.barrier()
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {}
        for name in names:
            recs = [g[name] for g in gathered]
            bad = [r for r in recs if r["outcome"] == "failed"]
            merged[name] = dict(bad[0] if bad else recs[0],
                                built=[r["built"] for r in recs])
        Path(out).write_text(json.dumps(merged, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
