"""Functional SyncBN over any DLPack array (NumPy, PyTorch, CuPy, ...).

Outputs are allocated in the input's own framework and memory layout; the math and the
communication run in the compiled core with the GIL released.
"""

from __future__ import annotations

import itertools
import operator
import os
from dataclasses import dataclass

from . import _arrays, _core
from . import comm as _comm

__all__ = [
    "BatchNormContext",
    "CollectiveMismatchError",
    "new_layer_id",
    "set_fingerprint",
    "fingerprint_enabled",
    "stats_buffer_size",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "allreduce",
    "batch_norm_gather_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]


CollectiveMismatchError = _core.CollectiveMismatchError

_INT32 = 2**31


def _int(v, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None


def _axis(v, x=None) -> int:
    """An int channel axis; one no array can have is refused here with the array's range
    (the core would only see a truncated int)."""
    axis = _int(v, "axis")
    if not -_INT32 <= axis < _INT32:
        nd = len(getattr(x, "shape", ()))
        raise ValueError(f"axis: expected an integer in [{-nd}, {nd}) for x of {nd} "
                         f"dimensions, got {axis}")
    return axis


def _float(v, name: str) -> float:
    shape = getattr(v, "shape", ())
    if isinstance(v, (bool, str, bytes)) or tuple(shape) != () or \
            not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        what = type(v).__name__ + (f" of shape {tuple(shape)}" if tuple(shape) else "")
        raise TypeError(f"{name}: expected a float, got {what}")
    return float(v)


# ---- collective fingerprints -----------------------------------------------------------

_layer_ids = itertools.count(1)
_fingerprint = os.environ.get("SYNCBN_FINGERPRINT", "1").strip().lower() not in (
    "0", "false", "off", "no")


def new_layer_id() -> int:
    """A new layer identity for the collective fingerprint: 1, 2, ... in the order layers
    are built in this process, so the same model built on every rank gives every layer the
    same id everywhere. The adapters take one per layer; functional calls use 0."""
    return next(_layer_ids)


def set_fingerprint(enabled: bool) -> None:
    """Turns the check of collective fingerprints on (the default) or off for this
    process; ``SYNCBN_FINGERPRINT=0`` in the environment starts with it off. Every
    all-reduce still carries the fingerprint (same payload either way); off, a rank only
    skips judging it, so ranks that disagree are no longer stopped with
    :class:`CollectiveMismatchError`. Validation of the reduced counts and sums stays on."""
    global _fingerprint
    _fingerprint = bool(enabled)


def fingerprint_enabled() -> bool:
    """Whether this process checks collective fingerprints (see :func:`set_fingerprint`)."""
    return _fingerprint


@dataclass
class BatchNormContext:
    """What :func:`batch_norm_backward` needs from a forward call."""

    x: object
    weight: object
    bias: object
    mean: object  # float64 (C,) on x's device, global batch mean (or running mean in eval)
    invstd: object  # float64 (C,) on x's device
    count: object  # global count per channel (training) or local count (eval): a float on
    # the host, a float64 (1,) array on a device (read back only if the caller does)
    axis: int
    training: bool
    comm: _core.Communicator
    layer: int = 0
    layer_name: str = ""


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, axis=1, comm=None,
                       unbiased_running_var=True, layer=0, layer_name=""):
    """Batch norm of ``x`` with the statistics of the global batch across ``comm``.

    In training, one all-reduce of 2C+1 float64 values gives every rank the global mean
    and variance; running stats are updated in place (PyTorch convention:
    ``new = (1 - momentum) * old + momentum * batch``, running_var unbiased with the global
    count). In eval (``training=False``) the running stats are used and nothing is sent.

    Returns ``(y, ctx)``: ``y`` of x's kind and layout, ``ctx`` for
    :func:`batch_norm_backward`. With a global count of 0, ``y`` is empty and the running
    stats are untouched; with a global count of 1, every rank raises ``ValueError``.
    ``unbiased_running_var=False`` updates running_var with the biased variance (Keras).

    On a CUDA device everything runs on the framework's current stream and nothing is read
    back to the host (``ctx.count`` stays a device array); a global count of 1 is then not
    raised (the running stats are left untouched instead, as by a failed call).

    ``layer`` / ``layer_name``: the identity of the layer in the collective's fingerprint
    (see :func:`new_layer_id`; 0 for functional calls) and its name in errors. Ranks that
    reduce different things at the same point (another layer, axis, channel count, call)
    all raise :class:`CollectiveMismatchError` before anything is written.
    """
    axis = _axis(axis, x)
    momentum = _float(momentum, "momentum")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a finite number in [0, 1], got {momentum}")
    eps = _float(eps, "eps")
    training = bool(training)
    c = _comm.as_communicator(comm, like=x) if training else _comm.local()
    C = _arrays.channels(x, axis)
    y = _arrays.empty_like(x)
    stream = _arrays.prepare(x)
    mean, invstd = _arrays.vector(C, x), _arrays.vector(C, x)
    save_count = _arrays.vector(1, x) if _arrays.is_cuda(x) else None
    ex = _arrays.export
    layer, layer_name = _int(layer, "layer"), str(layer_name or "")
    count = _core.forward(ex(x, "x"), ex(weight, "weight"), ex(bias, "bias"),
                          ex(running_mean, "running_mean"), ex(running_var, "running_var"),
                          ex(y), ex(mean), ex(invstd), training, momentum, eps, axis, c,
                          bool(unbiased_running_var), ex(save_count), stream, layer,
                          layer_name, _fingerprint)
    if save_count is not None:
        count = save_count
    ctx = BatchNormContext(x, weight, bias, mean, invstd, count, axis, training, c, layer,
                           layer_name)
    return y, ctx


def batch_norm_backward(dy, ctx: BatchNormContext, *, need_dx=True):
    """Gradients of :func:`batch_norm_forward`: ``(dx, dweight, dbias)``.

    ``dx`` equals plain batch norm's input gradient on the concatenated global batch (one
    all-reduce of 2C float64 values in training). ``dweight``/``dbias`` are this rank's
    local gradients, to be summed by a data-parallel optimizer like any other parameter
    gradient; ``None`` when weight/bias were ``None``. With ``need_dx=False`` dx is
    ``None`` and nothing is communicated.
    """
    dx = _arrays.empty_like(ctx.x) if need_dx else None
    dw = _arrays.empty_like(ctx.weight) if ctx.weight is not None else None
    db = _arrays.empty_like(ctx.bias) if ctx.bias is not None else None
    ex = _arrays.export
    stream = _arrays.prepare(ctx.x)
    on_host = isinstance(ctx.count, float)
    _core.backward(ex(dy, "dy"), ex(ctx.x), ex(ctx.mean), ex(ctx.invstd), ex(ctx.weight),
                   ex(dx), ex(dw), ex(db), ctx.training,
                   ctx.count if on_host else float("nan"), ctx.axis, ctx.comm,
                   None if on_host else ex(ctx.count), stream, ctx.layer, ctx.layer_name,
                   _fingerprint)
    return dx, dw, db


# ---- primitives (ATen names), for users who wire their own -----------------------------


# Fingerprint slots behind [payload (2C) | count] in every all-reduce buffer (ops.h).
FINGERPRINT_SLOTS = 16


def stats_buffer_size(channels: int) -> int:
    """Length of the forward statistics buffer (and of the backward sums) for C channels:
    ``2C + 1 + FINGERPRINT_SLOTS``."""
    return 2 * int(channels) + 1 + FINGERPRINT_SLOTS


def _channels_of_buffer(buffer) -> int:
    n = getattr(buffer, "shape", (0,))
    return max(0, (int(n[0]) - 1 - FINGERPRINT_SLOTS) // 2) if len(n) == 1 else 0


def batch_norm_stats(x, axis=1, *, layer=0, call=0):
    """Local partial statistics of x, packed ready to all-reduce: a float64 buffer
    ``[n*mean (C) | M2 + n*mean^2 (C) | n | fingerprint (16)]`` (see
    core/internal/syncbn/math.h and ops.h). ``layer``, ``call``: the layer's identity
    (as in :func:`batch_norm_forward`) and this call's number, if you count your calls:
    both go into the fingerprint, which the other primitives check."""
    axis = _axis(axis, x)
    buf = _arrays.vector(stats_buffer_size(_arrays.channels(x, axis)), x)
    _core.batch_norm_stats(_arrays.export(x, "x"), axis, _arrays.export(buf),
                           _arrays.prepare(x), _int(layer, "layer"), "", _fingerprint,
                           _int(call, "call"))
    return buf


def allreduce(buffer, comm=None):
    """Sums a float64 buffer in place across ``comm``; returns it."""
    c = _comm.as_communicator(comm, like=buffer)
    _core.allreduce(_arrays.export(buffer, "buffer"), c, _arrays.prepare(buffer))
    return buffer


def batch_norm_gather_stats(buffer, running_mean=None, running_var=None, *, momentum=0.1,
                            eps=1e-5, layer=0):
    """Global ``(mean, invstd, var, count)`` from an all-reduced stats buffer (var biased,
    float64); updates running stats in place as :func:`batch_norm_forward` does. Checks
    the buffer first (ranks' fingerprints agree, count a whole number >= 0, sums finite
    unless some rank's input was not) and writes nothing when it fails. On a device
    ``count`` is ``buffer[2C:2C+1]``, still on the device."""
    C = _channels_of_buffer(buffer)
    mean, invstd, var = (_arrays.vector(C, buffer) for _ in range(3))
    ex = _arrays.export
    count = _core.batch_norm_gather_stats(ex(buffer, "buffer"), _float(momentum, "momentum"),
                                          _float(eps, "eps"), ex(running_mean, "running_mean"),
                                          ex(running_var, "running_var"), ex(mean), ex(invstd),
                                          ex(var), _arrays.prepare(buffer),
                                          _int(layer, "layer"), "", _fingerprint)
    if _arrays.is_cuda(buffer):
        count = buffer[2 * C:2 * C + 1]
    return mean, invstd, var, count


def batch_norm_elemt(x, mean, invstd, weight=None, bias=None, *, axis=1):
    """``y = (x - mean) * invstd * weight + bias`` along ``axis``."""
    ex = _arrays.export
    y = _arrays.empty_like(x)
    _core.batch_norm_elemt(ex(x, "x"), _axis(axis, x), ex(mean, "mean"), ex(invstd, "invstd"),
                           ex(weight, "weight"), ex(bias, "bias"), ex(y), _arrays.prepare(x))
    return y


def batch_norm_backward_reduce(dy, x, mean, invstd, *, axis=1, weight_grad=True,
                               bias_grad=True, layer=0, call=0):
    """Local ``sums = [sum(dy) | sum(dy * (x - mean)) | n | fingerprint]`` (float64, the
    length of :func:`stats_buffer_size`, ready to all-reduce) and this rank's
    ``grad_weight``, ``grad_bias`` (float64, or None)."""
    ex = _arrays.export
    axis = _axis(axis, x)
    C = _arrays.channels(x, axis)
    sums = _arrays.vector(stats_buffer_size(C), x)
    gw = _arrays.vector(C, x) if weight_grad else None
    gb = _arrays.vector(C, x) if bias_grad else None
    _core.batch_norm_backward_reduce(ex(dy, "dy"), ex(x, "x"), axis, ex(mean, "mean"),
                                     ex(invstd, "invstd"), ex(sums), ex(gw), ex(gb),
                                     _arrays.prepare(x), _int(layer, "layer"), "", _fingerprint,
                                     _int(call, "call"))
    return sums, gw, gb


def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sums, count, *, axis=1, layer=0):
    """dx from all-reduced ``sums`` and the global ``count`` per channel (a number, or on a
    device the (1,) array :func:`batch_norm_gather_stats` returned). Checks ``sums`` as
    :func:`batch_norm_gather_stats` checks its buffer, and that it was reduced over
    ``count`` values per channel."""
    ex = _arrays.export
    dx = _arrays.empty_like(x)
    if not hasattr(count, "__dlpack__"):
        count = _float(count, "count")
    _core.batch_norm_backward_elemt(ex(dy, "dy"), ex(x, "x"), _axis(axis, x), ex(mean, "mean"),
                                    ex(invstd, "invstd"), ex(weight, "weight"),
                                    ex(sums, "sums"), ex(count, "count"), ex(dx),
                                    _arrays.prepare(x), _int(layer, "layer"), "", _fingerprint)
    return dx
