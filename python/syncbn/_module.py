"""The array-module SyncBatchNorm behind syncbn.numpy and syncbn.cupy: PyTorch's
conventions (axis=1, momentum=0.1, eps=1e-5) over any array namespace `xp`."""

from __future__ import annotations

from . import comm as _comm
from .functional import _axis, _float, batch_norm_backward, batch_norm_forward, new_layer_id


class ArraySyncBatchNorm:
    """Synchronized batch norm over the arrays of ``_xp`` (set by subclasses).

    Parameters and buffers are plain attributes (``weight``, ``bias``, ``running_mean``,
    ``running_var``, ``num_batches_tracked``), float32 by default. ``forward(x,
    training=True)`` normalizes with the statistics of the global batch across ``comm``
    (default: :func:`syncbn.comm.default`); ``backward(dy)`` returns dx and sets
    ``grad_weight`` / ``grad_bias`` to this rank's local gradients.

    ``momentum=None`` gives a cumulative moving average (1 / num_batches_tracked), as in
    PyTorch. Eval (``training=False``) uses the running statistics and never
    communicates; with ``track_running_stats=False`` it uses the local batch statistics.

    ``backward`` uses the context of the last successful ``forward`` (a failed forward
    clears it); it reads x as it was given, so do not change x in place in between.
    ``name``: how errors name this layer (default: by its layer id).
    """

    def __init__(self, num_features, axis=1, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, dtype="float32", name=None):
        import operator

        xp = self._xp
        try:
            ok = not isinstance(num_features, bool) and operator.index(num_features) > 0
        except TypeError:
            ok = False
        if not ok:
            raise ValueError(f"num_features: expected a positive int, got {num_features!r}")
        if momentum is not None and not 0.0 <= _float(momentum, "momentum") <= 1.0:
            raise ValueError(f"momentum: expected a float in [0, 1] or None, got {momentum!r}")
        eps = _float(eps, "eps")
        if not 0.0 < eps < float("inf"):
            raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
        self.num_features = int(num_features)
        self.axis = _axis(axis)
        self.eps = eps
        self.momentum = None if momentum is None else float(momentum)
        self.layer_id = new_layer_id()
        self.name = "" if name is None else str(name)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self._comm_arg = comm
        self._comm = None
        C = self.num_features
        self.weight = xp.ones(C, dtype) if affine else None
        self.bias = xp.zeros(C, dtype) if affine else None
        self.grad_weight = None
        self.grad_bias = None
        if track_running_stats:
            self.running_mean = xp.zeros(C, dtype)
            self.running_var = xp.ones(C, dtype)
            self.num_batches_tracked = xp.zeros((), xp.int64)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self._ctx = None

    def communicator(self, like=None):
        """The communicator of training forwards (resolved on first use; ``like``: an
        input, whose device picks the default)."""
        if self._comm is None:
            if self._comm_arg is None:
                return _comm.default(like)
            self._comm = _comm.as_communicator(self._comm_arg, like)
        return self._comm

    def forward(self, x, training=True):
        self._ctx = None  # a failed forward leaves no context for backward
        training = bool(training)
        shape = getattr(x, "shape", None)
        if shape is not None and len(shape) >= 2 and -len(shape) <= self.axis < len(shape) \
                and shape[self.axis] != self.num_features:
            raise ValueError(f"x: expected {self.num_features} channels (num_features) along "
                             f"axis {self.axis}, got shape {tuple(shape)}")
        # PyTorch's rule: batch statistics in training, or whenever there are no running
        # ones; synchronize only in training.
        use_batch_stats = training or self.running_mean is None
        momentum = 0.0
        update = training and self.track_running_stats
        if update:
            if self.momentum is None:
                momentum = 1.0 / float(self.num_batches_tracked + 1)
            else:
                momentum = float(self.momentum)
        y, ctx = batch_norm_forward(
            x, self.weight, self.bias,
            self.running_mean if update or not use_batch_stats else None,
            self.running_var if update or not use_batch_stats else None,
            training=use_batch_stats, momentum=momentum, eps=self.eps, axis=self.axis,
            comm=self.communicator(x) if training else _comm.local(),
            layer=self.layer_id, layer_name=self.name,
        )
        # On a device the count stays there (no host sync): counted like PyTorch.
        if update and (not isinstance(ctx.count, float) or ctx.count > 0):
            self.num_batches_tracked += 1
        self._ctx = ctx
        return y

    __call__ = forward

    def backward(self, dy):
        if self._ctx is None:
            raise RuntimeError("backward: expected a successful forward first (none since "
                               "this layer was built, or the last one raised)")
        dx, self.grad_weight, self.grad_bias = batch_norm_backward(dy, self._ctx)
        return dx

    def __repr__(self):
        return (f"{type(self).__name__}({self.num_features}, axis={self.axis}, eps={self.eps}, "
                f"momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats})")
