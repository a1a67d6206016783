"""pytest plugin for run_upstream.py: swaps the class (SYNCBN_UPSTREAM_MODE=ours) before
PyTorch's test files are imported, and writes every test's outcome, skip reason and the
number of syncbn modules it built to SYNCBN_UPSTREAM_REPORT (JSON)."""

from __future__ import annotations

import json
import os

import pytest

_MODE = os.environ.get("SYNCBN_UPSTREAM_MODE", "ours")
_results: dict[str, dict] = {}
_stack = None


def pytest_configure(config):
    global _stack
    import contextlib

    import swap
    import torch

    if _MODE == "ours":
        _stack = contextlib.ExitStack()
        _stack.enter_context(swap.swap(batchnorm=True, sync=True, module_db=True))
        # The swap must be in effect before collection imports the test files.
        before = swap.constructions["count"]
        m = torch.nn.BatchNorm2d(3)
        assert isinstance(m, swap.SyncBatchNorm2d), type(m)
        assert isinstance(torch.nn.SyncBatchNorm(3), swap.sbt.SyncBatchNorm)
        assert swap.constructions["count"] == before + 2
    elif _MODE != "torch":
        raise pytest.UsageError(f"SYNCBN_UPSTREAM_MODE: expected 'ours' or 'torch', got {_MODE!r}")


def pytest_unconfigure(config):
    if _stack is not None:
        _stack.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    import swap

    before = swap.constructions["count"]
    yield
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    rec["built"] = swap.constructions["count"] - before


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    if rep.skipped:
        if hasattr(rep, "wasxfail"):
            rec.update(outcome="xfailed", reason=str(rep.wasxfail))
        else:
            reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
            rec.update(outcome="skipped", reason=reason)
    elif rep.failed:
        if rec["outcome"] != "failed":  # the first failing phase tells why
            msg = getattr(rep.longrepr, "reprcrash", None)
            rec.update(outcome="failed", phase=rep.when,
                       reason=msg.message if msg is not None else str(rep.longrepr)[-400:])
    elif rep.when == "call" and hasattr(rep, "wasxfail"):
        rec.update(outcome="xpassed")


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SYNCBN_UPSTREAM_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f, indent=1, sort_keys=True)
