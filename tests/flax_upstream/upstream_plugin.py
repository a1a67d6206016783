"""pytest plugin for run_upstream.py: with SYNCBN_UPSTREAM_MODE=ours, ``flax.nnx.BatchNorm``
is ``syncbn.flax.BatchNorm`` and ``flax.linen.BatchNorm`` is ``syncbn.flax.LinenBatchNorm``
for the run (the names Flax's tests use); SYNCBN_UPSTREAM_MODE=flax leaves Flax's classes.
Writes every test's outcome, skip or failure reason and how many syncbn layers it built
(nnx constructions, linen module instances) to SYNCBN_UPSTREAM_REPORT (JSON)."""

from __future__ import annotations

import json
import os

import pytest

_MODE = os.environ.get("SYNCBN_UPSTREAM_MODE", "ours")
_results: dict[str, dict] = {}
built = {"nnx": 0, "linen": 0}
_undo: list = []


def _set(obj, name, value):
    _undo.append((obj, name, getattr(obj, name)))
    setattr(obj, name, value)


def pytest_configure(config):
    if _MODE not in ("ours", "flax"):
        raise pytest.UsageError(f"SYNCBN_UPSTREAM_MODE: expected 'ours' or 'flax', got "
                                f"{_MODE!r}")
    import flax.linen
    import flax.nnx

    import syncbn.flax as sbf

    nnx_init = sbf.BatchNorm.__init__

    def counted_init(self, *args, **kwargs):
        built["nnx"] += 1  # before: a constructor that raises counts too
        nnx_init(self, *args, **kwargs)

    linen_post_init = sbf.LinenBatchNorm.__post_init__

    def counted_post_init(self):
        built["linen"] += 1
        linen_post_init(self)

    _set(sbf.BatchNorm, "__init__", counted_init)
    _set(sbf.LinenBatchNorm, "__post_init__", counted_post_init)
    if _MODE == "ours":
        _set(flax.nnx, "BatchNorm", sbf.BatchNorm)
        _set(flax.linen, "BatchNorm", sbf.LinenBatchNorm)
        # The swap is in effect before collection imports the test files.
        before = dict(built)
        assert isinstance(flax.nnx.BatchNorm(3, rngs=flax.nnx.Rngs(0)), sbf.BatchNorm)
        assert isinstance(flax.linen.BatchNorm(), sbf.LinenBatchNorm)
        assert built == {"nnx": before["nnx"] + 1, "linen": before["linen"] + 1}, built


def pytest_unconfigure(config):
    while _undo:
        obj, name, value = _undo.pop()
        setattr(obj, name, value)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = dict(built)
    yield
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    rec["built"] = {k: built[k] - before[k] for k in built}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    if rep.skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        rec.update(outcome="skipped", reason=reason)
    elif rep.failed and rec["outcome"] != "failed":  # the first failing phase tells why
        msg = getattr(rep.longrepr, "reprcrash", None)
        rec.update(outcome="failed", phase=rep.when,
                   reason=msg.message if msg is not None else str(rep.longrepr)[-400:])


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("SYNCBN_UPSTREAM_REPORT")
    if path:
        with open(path, "w") as f:
            json.dump(_results, f, indent=1, sort_keys=True)
