"""Flax BatchNorm with the statistics of the global batch across processes.

    from syncbn.flax import BatchNorm          # flax.nnx.BatchNorm's arguments and state
    from syncbn.flax import LinenBatchNorm     # flax.linen.BatchNorm's fields and variables

Drop-in for Flax's ``BatchNorm``: the same constructor arguments (plus ``comm``), the
same variables (``scale``, ``bias`` params; ``mean``, ``var`` batch statistics, float32),
Flax's conventions (momentum 0.99 weighs the old value, biased variance, epsilon 1e-5),
so a model swaps it in and its checkpoints load both ways. Training synchronizes over
``comm`` (default: MPI ``COMM_WORLD`` under an MPI launcher, else none) inside
``jax.jit`` / ``nnx.jit``; ``use_running_average=True`` never communicates. The math runs
in syncbn's core (:func:`syncbn.jax.batch_norm`).
"""

from __future__ import annotations

import hashlib
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from flax import nnx
from flax.linen.dtypes import canonicalize_dtype

from . import comm as _comm
from .functional import new_layer_id
from .jax import batch_norm

__all__ = ["BatchNorm", "LinenBatchNorm"]


def _unsupported(axis_name, axis_index_groups):
    if axis_name is not None or axis_index_groups is not None:
        raise ValueError(
            "axis_name, axis_index_groups: syncbn's BatchNorm synchronizes across processes "
            "through `comm` (MPI), not across a pmap/shard_map axis; use flax's BatchNorm "
            "with axis_name inside one SPMD program")


def _int_axis(axis) -> int:
    if isinstance(axis, (tuple, list)) and len(axis) == 1:
        axis = axis[0]
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise NotImplementedError(f"axis: syncbn's BatchNorm takes one feature axis (an int), "
                                  f"got {axis!r}")
    return axis


def _dtypes(x, scale, bias, dtype):
    """Flax's _normalize dtypes: computed in the promotion of x, scale and bias (x is not
    rounded to ``dtype`` first), returned in ``dtype`` if given, else that promotion."""
    args = [a for a in (x, scale, bias) if a is not None]
    compute, out = canonicalize_dtype(*args), canonicalize_dtype(*args, dtype=dtype)
    cast = [None if a is None else jnp.asarray(a, compute) for a in (x, scale, bias)]
    return (*cast, out)


def _resolve(comm):
    # mpi4py communicators are not hashable (NNX keeps static attributes in its graph
    # definitions): keep syncbn's communicator object instead.
    return None if comm is None else _comm.as_communicator(comm)


class BatchNorm(nnx.BatchNorm):
    """``flax.nnx.BatchNorm`` with the statistics of the global batch.

    Same arguments and state as ``nnx.BatchNorm`` (it is a subclass), plus ``comm`` (see
    :func:`syncbn.jax.batch_norm`) and ``name`` (how errors name the layer). Not supported
    (raise): ``axis_name``/``axis_index_groups`` (that is flax's own SPMD
    synchronization), several feature axes. ``mask`` (flax's: broadcastable to x) gives
    the statistics of the masked-in elements of every rank (see
    :func:`syncbn.jax.batch_norm`). ``use_fast_variance`` is accepted and ignored:
    the variance is always computed the stable way, in float64.
    """

    def __init__(self, num_features: int, *, axis_name=None, axis_index_groups=None,
                 comm=None, name: str | None = None, **kwargs):
        _unsupported(axis_name, axis_index_groups)
        super().__init__(num_features, **kwargs)
        _int_axis(self.axis)
        self.comm = _resolve(comm)
        self.layer_id = new_layer_id()  # identity in collective fingerprints
        self.layer_name = name or ""

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("use_running_average: no value was given to BatchNorm (pass it "
                             "to the constructor, to the call, or use model.train()/eval())")
        scale = self.scale[...] if self.scale is not None else None
        bias = self.bias[...] if self.bias is not None else None
        # Flax's promotion: x, scale and bias in self.dtype (by default; a model may give
        # its own promote_dtype), then flax's _normalize dtypes.
        x, _, _, scale, bias = self.promote_dtype(
            (x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
        x, scale, bias, out_dtype = _dtypes(x, scale, bias, self.dtype)
        training = not use_running_average
        y, (mean, var) = batch_norm(
            x, scale, bias, (self.mean[...], self.var[...]), training=training,
            momentum=self.momentum, epsilon=self.epsilon, axis=_int_axis(self.axis),
            comm=self.comm, layer=self.layer_id, layer_name=self.layer_name, mask=mask)
        if training:
            self.mean[...] = mean
            self.var[...] = var
        return jnp.asarray(y, out_dtype)


def _path_id(path: tuple) -> int:
    """A layer id from a linen module's path: the same on every rank for the same model,
    and stable across `apply` calls (linen modules are rebuilt on every call)."""
    h = hashlib.blake2b("/".join(map(str, path)).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") >> 2 | 1  # positive, nonzero, below 2**62


class LinenBatchNorm(nn.BatchNorm):
    """``flax.linen.BatchNorm`` with the statistics of the global batch: the same fields
    and variables (``params``: scale, bias; ``batch_stats``: mean, var), plus ``comm``.
    Initialization never communicates: as in flax, it normalizes with the local batch's
    statistics (training) and does not update the running ones.
    ``force_float32_reductions`` must stay True (statistics are float32); the other
    limits are those of :class:`BatchNorm`."""

    comm: Any = None

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        _unsupported(self.axis_name, self.axis_index_groups)
        if not self.force_float32_reductions:
            raise NotImplementedError("force_float32_reductions=False: syncbn's statistics "
                                      "are float32 (accumulated in float64)")
        use_running_average = nn.merge_param("use_running_average",
                                             self.use_running_average, use_running_average)
        axis = _int_axis(self.axis)
        C = x.shape[axis]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (C,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (C,))
        scale = self.param("scale", self.scale_init, (C,), self.param_dtype) \
            if self.use_scale else None
        bias = self.param("bias", self.bias_init, (C,), self.param_dtype) \
            if self.use_bias else None
        x, scale, bias, out_dtype = _dtypes(x, scale, bias, self.dtype)
        training = not use_running_average
        # Initialization normalizes with this rank's batch statistics and keeps the initial
        # ones, as flax (which leaves out axis_name then): no collective, so one rank may
        # initialize alone.
        initializing = self.is_initializing()
        y, (mean, var) = batch_norm(
            x, scale, bias, (ra_mean.value, ra_var.value), training=training,
            momentum=self.momentum, epsilon=self.epsilon, axis=axis,
            comm=_comm.local() if initializing else self.comm,
            layer=_path_id(self.scope.path), layer_name="/".join(map(str, self.scope.path)),
            mask=mask)
        if training and not initializing:
            ra_mean.value, ra_var.value = mean, var
        return jnp.asarray(y, out_dtype)


# Linen names submodules after their class ("BatchNorm_0"): the same name as flax's keeps
# the variable paths, so checkpoints load both ways.
LinenBatchNorm.__name__ = LinenBatchNorm.__qualname__ = "BatchNorm"
