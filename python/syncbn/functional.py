"""Functional SyncBN over any DLPack array (NumPy, PyTorch, CuPy, ...).

Outputs are allocated in the input's own framework and memory layout; the math and the
communication run in the compiled core with the GIL released.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

from . import _arrays, _core
from . import comm as _comm

__all__ = [
    "BatchNormContext",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_stats",
    "allreduce",
    "batch_norm_gather_stats",
    "batch_norm_elemt",
    "batch_norm_backward_reduce",
    "batch_norm_backward_elemt",
]


def _int(v, name: str) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{name}: expected an int, got bool")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{name}: expected an int, got {type(v).__name__}") from None


def _float(v, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) and not hasattr(v, "__float__"):
        raise TypeError(f"{name}: expected a float, got {type(v).__name__}")
    return float(v)


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


def batch_norm_forward(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                       training=True, momentum=0.1, eps=1e-5, axis=1, comm=None,
                       unbiased_running_var=True):
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
    """
    axis = _int(axis, "axis")
    momentum = _float(momentum, "momentum")
    eps = _float(eps, "eps")
    training = bool(training)
    c = _comm.as_communicator(comm, like=x) if training else _comm.local()
    C = _arrays.channels(x, axis)
    y = _arrays.empty_like(x)
    stream = _arrays.prepare(x)
    mean, invstd = _arrays.vector(C, x), _arrays.vector(C, x)
    save_count = _arrays.vector(1, x) if _arrays.is_cuda(x) else None
    ex = _arrays.export
    count = _core.forward(ex(x), ex(weight), ex(bias), ex(running_mean), ex(running_var),
                          ex(y), ex(mean), ex(invstd), training, momentum, eps, axis, c,
                          bool(unbiased_running_var), ex(save_count), stream)
    if save_count is not None:
        count = save_count
    ctx = BatchNormContext(x, weight, bias, mean, invstd, count, axis, training, c)
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
    _core.backward(ex(dy), ex(ctx.x), ex(ctx.mean), ex(ctx.invstd), ex(ctx.weight), ex(dx),
                   ex(dw), ex(db), ctx.training, ctx.count if on_host else float("nan"),
                   ctx.axis, ctx.comm, None if on_host else ex(ctx.count), stream)
    return dx, dw, db


# ---- primitives (ATen names), for users who wire their own -----------------------------


def batch_norm_stats(x, axis=1):
    """Local partial statistics of x, packed ready to all-reduce: a float64 buffer of
    2C+1 values ``[n*mean (C) | M2 + n*mean^2 (C) | n]`` (see core/internal/syncbn/math.h)."""
    axis = _int(axis, "axis")
    buf = _arrays.vector(2 * _arrays.channels(x, axis) + 1, x)
    _core.batch_norm_stats(_arrays.export(x), axis, _arrays.export(buf), _arrays.prepare(x))
    return buf


def allreduce(buffer, comm=None):
    """Sums a float64 buffer in place across ``comm``; returns it."""
    c = _comm.as_communicator(comm, like=buffer)
    _core.allreduce(_arrays.export(buffer), c, _arrays.prepare(buffer))
    return buffer


def batch_norm_gather_stats(buffer, running_mean=None, running_var=None, *, momentum=0.1,
                            eps=1e-5):
    """Global ``(mean, invstd, var, count)`` from an all-reduced stats buffer (var biased,
    float64); updates running stats in place as :func:`batch_norm_forward` does. On a
    device ``count`` is ``buffer[-1:]``, still on the device."""
    n = getattr(buffer, "shape", (1,))
    C = (int(n[0]) - 1) // 2 if len(n) == 1 else 0
    mean, invstd, var = (_arrays.vector(C, buffer) for _ in range(3))
    ex = _arrays.export
    count = _core.batch_norm_gather_stats(ex(buffer), _float(momentum, "momentum"),
                                          _float(eps, "eps"), ex(running_mean),
                                          ex(running_var), ex(mean), ex(invstd), ex(var),
                                          _arrays.prepare(buffer))
    if _arrays.is_cuda(buffer):
        count = buffer[-1:]
    return mean, invstd, var, count


def batch_norm_elemt(x, mean, invstd, weight=None, bias=None, *, axis=1):
    """``y = (x - mean) * invstd * weight + bias`` along ``axis``."""
    ex = _arrays.export
    y = _arrays.empty_like(x)
    _core.batch_norm_elemt(ex(x), _int(axis, "axis"), ex(mean), ex(invstd), ex(weight),
                           ex(bias), ex(y), _arrays.prepare(x))
    return y


def batch_norm_backward_reduce(dy, x, mean, invstd, *, axis=1, weight_grad=True,
                               bias_grad=True):
    """Local ``sums = [sum(dy) | sum(dy * (x - mean))]`` (float64, 2C, ready to
    all-reduce) and this rank's ``grad_weight``, ``grad_bias`` (float64, or None)."""
    ex = _arrays.export
    axis = _int(axis, "axis")
    C = _arrays.channels(x, axis)
    sums = _arrays.vector(2 * C, x)
    gw = _arrays.vector(C, x) if weight_grad else None
    gb = _arrays.vector(C, x) if bias_grad else None
    _core.batch_norm_backward_reduce(ex(dy), ex(x), axis, ex(mean), ex(invstd), ex(sums),
                                     ex(gw), ex(gb), _arrays.prepare(x))
    return sums, gw, gb


def batch_norm_backward_elemt(dy, x, mean, invstd, weight, sums, count, *, axis=1):
    """dx from all-reduced ``sums`` and the global ``count`` per channel (a number, or on a
    device the (1,) array :func:`batch_norm_gather_stats` returned)."""
    ex = _arrays.export
    dx = _arrays.empty_like(x)
    if not hasattr(count, "__dlpack__"):
        count = _float(count, "count")
    _core.batch_norm_backward_elemt(ex(dy), ex(x), _int(axis, "axis"), ex(mean), ex(invstd),
                                    ex(weight), ex(sums), ex(count), ex(dx),
                                    _arrays.prepare(x))
    return dx
