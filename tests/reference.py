"""Float64 NumPy reference of plain batch norm (one process, the whole batch at hand).

Every function takes NumPy arrays (or anything np.asarray accepts), computes in float64
from the textbook formulas, and returns float64 arrays in the input's logical shape.
"""

from __future__ import annotations

import numpy as np


def as_f64(a):
    """A float64 NumPy copy of a NumPy array or a (CPU) torch tensor; None stays None."""
    if a is None:
        return None
    if type(a).__module__.split(".", 1)[0] == "torch":
        import torch

        return a.detach().to(torch.float64).cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _channels_last(a, axis):
    """(a moved so the channel axis is last, reshaped to (count, C)), and a function that
    undoes it for an array of that (count, C) shape."""
    a = as_f64(a)
    moved = np.moveaxis(a, axis, -1)
    shape = moved.shape

    def back(m):
        return np.moveaxis(m.reshape(shape), -1, axis)

    return moved.reshape(-1, shape[-1]), back


def batch_moments(x, axis=1):
    """Per-channel (mean, biased variance, unbiased variance, count) of x in float64."""
    x2, _ = _channels_last(x, axis)
    n = x2.shape[0]
    mean = x2.mean(axis=0)
    m2 = ((x2 - mean) ** 2).sum(axis=0)
    return mean, m2 / n, m2 / (n - 1) if n > 1 else np.full_like(mean, np.nan), n


def bn_forward_ref(x, w=None, b=None, axis=1, eps=1e-5):
    """y = (x - mean) / sqrt(var + eps) * w + b with the batch's mean and biased variance."""
    x2, back = _channels_last(x, axis)
    C = x2.shape[1]
    w = np.ones(C) if w is None else as_f64(w)
    b = np.zeros(C) if b is None else as_f64(b)
    mean, var, _, _ = batch_moments(x, axis)
    y2 = (x2 - mean) / np.sqrt(var + eps) * w + b
    return back(y2)


def bn_backward_ref(dy, x, w=None, axis=1, eps=1e-5):
    """(dx, dw, db) of :func:`bn_forward_ref` in training mode:
    dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)), dw = sum(dy * xhat),
    db = sum(dy)."""
    x2, back = _channels_last(x, axis)
    dy2, _ = _channels_last(dy, axis)
    C = x2.shape[1]
    w = np.ones(C) if w is None else as_f64(w)
    mean, var, _, _ = batch_moments(x, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (x2 - mean) * invstd
    db = dy2.sum(axis=0)
    dw = (dy2 * xhat).sum(axis=0)
    dx2 = w * invstd * (dy2 - dy2.mean(axis=0) - xhat * (dy2 * xhat).mean(axis=0))
    return back(dx2), dw, db


def bn_eval_ref(x, running_mean, running_var, w=None, b=None, axis=1, eps=1e-5):
    """y with the running statistics (eval mode)."""
    x2, back = _channels_last(x, axis)
    C = x2.shape[1]
    w = np.ones(C) if w is None else as_f64(w)
    b = np.zeros(C) if b is None else as_f64(b)
    y2 = (x2 - as_f64(running_mean)) / np.sqrt(as_f64(running_var) + eps) * w + b
    return back(y2)


def running_stats_ref(running_mean, running_var, x, axis=1, momentum=0.1):
    """PyTorch's update: new = (1 - momentum) * old + momentum * batch, with the batch
    variance unbiased (divided by count - 1). Returns float64 copies."""
    mean, _, var_u, _ = batch_moments(x, axis)
    rm = (1 - momentum) * as_f64(running_mean) + momentum * mean
    rv = (1 - momentum) * as_f64(running_var) + momentum * var_u
    return rm, rv
