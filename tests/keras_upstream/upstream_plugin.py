"""pytest plugin that runs Keras' own BatchNormalization tests against syncbn's class.

    KERAS_BACKEND=jax SYNCBN_UPSTREAM_MODE=ours SYNCBN_UPSTREAM_REPORT=r.json \
        python -m pytest .../keras/src/layers/normalization/batch_normalization_test.py \
        -p upstream_plugin

Keras' test module names its subject ``layers.BatchNormalization`` (``from keras.src import
layers``). With SYNCBN_UPSTREAM_MODE=ours, during each test of that module its global
``layers`` is a copy of ``keras.src.layers`` whose ``BatchNormalization`` is
``syncbn.keras.SyncBatchNormalization``; every other name (Masking, Input, ...) and the rest
of Keras are untouched, and the module's own ``layers`` is put back after the test. Every
construction of syncbn's layer (one that raises too) is counted, so a report proves the
class under test was syncbn's.
SYNCBN_UPSTREAM_MODE=keras runs Keras' own class (the baseline). The report (JSON) has each
test's outcome, skip or failure reason and the number of syncbn layers it built.
"""

from __future__ import annotations

import json
import os
import types

import pytest

_MODE = os.environ.get("SYNCBN_UPSTREAM_MODE", "ours")
_results: dict[str, dict] = {}
constructions = {"count": 0}


def pytest_configure(config):
    if _MODE not in ("ours", "keras"):
        raise pytest.UsageError(f"SYNCBN_UPSTREAM_MODE: expected 'ours' or 'keras', got "
                                f"{_MODE!r}")
    # Keras' conftest.py (not in the wheel) defines this mark: skip on backends that cannot
    # train (numpy, openvino). jax and torch can.
    config.addinivalue_line("markers", "requires_trainable_backend: Keras' own mark")
    from syncbn.keras import SyncBatchNormalization

    init = SyncBatchNormalization.__init__

    def counted_init(self, *args, **kwargs):
        constructions["count"] += 1  # before: a constructor that raises (renorm) counts too
        init(self, *args, **kwargs)

    SyncBatchNormalization.__init__ = counted_init
    config._syncbn_undo_init = (SyncBatchNormalization, init)


def pytest_unconfigure(config):
    undo = getattr(config, "_syncbn_undo_init", None)
    if undo is not None:
        undo[0].__init__ = undo[1]


def pytest_runtest_setup(item):
    import keras

    if item.get_closest_marker("requires_trainable_backend") and \
            keras.backend.backend() in ("numpy", "openvino"):
        pytest.skip("Trainer not implemented for this backend.")


def _swapped_layers(real):
    from syncbn.keras import SyncBatchNormalization

    ns = types.ModuleType(real.__name__, real.__doc__)
    ns.__dict__.update({k: v for k, v in vars(real).items() if k not in ("__name__", "__doc__")})
    ns.BatchNormalization = SyncBatchNormalization
    return ns


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    module = getattr(item, "module", None)
    real = getattr(module, "layers", None)
    swapped = _MODE == "ours" and real is not None and \
        getattr(real, "__name__", "") == "keras.src.layers"
    if swapped:
        module.layers = _swapped_layers(real)
    before = constructions["count"]
    try:
        yield
    finally:
        if swapped:
            module.layers = real
    rec = _results.setdefault(item.nodeid, {"outcome": "passed"})
    rec["built"] = constructions["count"] - before
    rec["swapped"] = swapped


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
