"""Keras 3 SyncBatchNormalization with the tf.keras API, on Keras' torch and JAX backends.

    import os; os.environ["KERAS_BACKEND"] = "torch"   # or "jax"
    from syncbn.keras import SyncBatchNormalization
    layer = SyncBatchNormalization(axis=-1, momentum=0.99, epsilon=1e-3)

Keras conventions: ``moving = momentum * moving + (1 - momentum) * batch`` with the
*biased* batch variance; weights named and ordered like
``keras.layers.BatchNormalization`` (gamma, beta, moving_mean, moving_variance), so they
transfer both ways. Training synchronizes over ``comm`` (default
:func:`syncbn.comm.default`: torch.distributed if initialized, else MPI COMM_WORLD under
an MPI launcher); inference uses the moving statistics and never communicates. On JAX the
layer runs through :func:`syncbn.jax.batch_norm` (XLA FFI), so ``model.fit``'s jit-compiled
train step synchronizes too; the moving statistics are assigned like any Keras state
(``stateless_call`` returns them).
"""

from __future__ import annotations

import math

import keras
from keras import ops

from . import comm as _comm
from .functional import new_layer_id

__all__ = ["SyncBatchNormalization"]


_SUPPORTED = ("torch", "jax")


def _check_backend(name: str) -> None:
    if name in _SUPPORTED:
        return
    if name == "tensorflow":
        raise RuntimeError(
            "syncbn.keras.SyncBatchNormalization: the TensorFlow backend is not supported; "
            "use keras.layers.BatchNormalization(synchronized=True), which synchronizes "
            "inside a tf.distribute strategy"
        )
    raise NotImplementedError(
        f"syncbn.keras.SyncBatchNormalization: the {name!r} Keras backend is not supported "
        "(only 'torch' and 'jax' are); set KERAS_BACKEND=torch or jax before importing keras"
    )


def _core_mask(mask, x, axes):
    """Keras' mask (one dimension less than x, broadcast over the last axis, as
    keras.layers.BatchNormalization does) in x's dtype as the core takes it: with 1 at the
    feature axes when it does not vary along them (one count for every feature), else x's
    shape (a count per feature, e.g. channels-first inputs)."""
    if mask is None:
        return None
    m = ops.expand_dims(mask, -1)
    shape = list(x.shape)
    if all(m.shape[a] == 1 for a in axes):
        shape = [1 if d in axes else n for d, n in enumerate(shape)]
    return ops.broadcast_to(ops.cast(ops.cast(m, "bool"), x.dtype), shape)


def _axes(axis):
    if isinstance(axis, bool):
        raise TypeError("axis: expected an int or a list of ints, got bool")
    if isinstance(axis, int):
        return axis
    if isinstance(axis, (list, tuple)) and axis and all(
            isinstance(a, int) and not isinstance(a, bool) for a in axis):
        if len(set(axis)) != len(axis):
            raise ValueError(f"axis: expected distinct axes, got {list(axis)}")
        return list(axis)
    raise TypeError(f"axis: expected an int or a non-empty list of ints, got {axis!r}")


@keras.saving.register_keras_serializable(package="syncbn")
class SyncBatchNormalization(keras.layers.BatchNormalization):
    """Batch normalization with the statistics of the global batch across ranks.

    Same arguments as ``tf.keras.layers.experimental.SyncBatchNormalization`` plus
    ``comm`` (a syncbn communicator, an mpi4py communicator, a torch.distributed group,
    or an object with ``rank``, ``size`` and ``allreduce(buf)``). ``axis`` may be an int
    or a list of ints, negative or positive; with several axes the parameters have the
    input's rank with 1 on the other axes (as in tf.keras). ``training=None`` follows
    Keras' learning phase; ``trainable=False`` means inference mode, as in Keras.
    """

    def __init__(self, axis=-1, momentum=0.99, epsilon=1e-3, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None, beta_constraint=None,
                 gamma_constraint=None, comm=None, renorm=False, renorm_clipping=None,
                 renorm_momentum=0.99, synchronized=True, **kwargs):
        _check_backend(keras.backend.backend())
        if renorm or renorm_clipping is not None:
            raise ValueError(
                "renorm, renorm_clipping: batch renormalization is not supported by "
                "syncbn.keras.SyncBatchNormalization (it would need the renorm statistics "
                "synchronized too); use renorm=False, or keras.layers.BatchNormalization"
                "(renorm=True) without synchronization")
        if not isinstance(synchronized, bool):
            raise TypeError(f"synchronized: expected a bool, got {type(synchronized).__name__}")
        # synchronized=False (a keras.layers.BatchNormalization config) is accepted: this
        # layer always synchronizes, which is what it is for.
        axis = _axes(axis)
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum: expected a float in [0, 1], got {momentum!r}")
        if not 0.0 < float(epsilon) < math.inf:
            raise ValueError(f"epsilon: expected a finite float > 0, got {epsilon!r}")
        super().__init__(
            axis=axis if isinstance(axis, int) else -1, momentum=momentum, epsilon=epsilon,
            center=center, scale=scale, beta_initializer=beta_initializer,
            gamma_initializer=gamma_initializer,
            moving_mean_initializer=moving_mean_initializer,
            moving_variance_initializer=moving_variance_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint, **kwargs)
        self.axis = axis
        self.comm = comm
        self._resolved_comm = None
        self._layer_id = new_layer_id()  # identity in collective fingerprints

    # ---- shapes --------------------------------------------------------------------

    def _normalized_axes(self, ndim):
        axes = [self.axis] if isinstance(self.axis, int) else list(self.axis)
        for a in axes:
            if not -ndim <= a < ndim:
                raise ValueError(f"axis: expected axes in [{-ndim}, {ndim}) for inputs of "
                                 f"rank {ndim}, got {self.axis}")
        return sorted(a % ndim for a in axes)

    def build(self, input_shape):
        axes = self._normalized_axes(len(input_shape))
        for a in axes:
            if input_shape[a] is None:
                raise ValueError(f"axis: the size of axis {a} must be known, got input "
                                 f"shape {tuple(input_shape)}")
        if len(axes) == 1:  # Keras' own build, which needs an int axis
            original = self.axis
            self.axis = original if isinstance(original, int) else original[0]
            super().build(input_shape)
            self.axis = original
            return
        shape = tuple(input_shape[d] if d in axes else 1 for d in range(len(input_shape)))
        if self.scale:
            self.gamma = self.add_weight(shape=shape, name="gamma",
                                         initializer=self.gamma_initializer,
                                         regularizer=self.gamma_regularizer,
                                         constraint=self.gamma_constraint, trainable=True,
                                         autocast=False)
        if self.center:
            self.beta = self.add_weight(shape=shape, name="beta",
                                        initializer=self.beta_initializer,
                                        regularizer=self.beta_regularizer,
                                        constraint=self.beta_constraint, trainable=True,
                                        autocast=False)
        self.moving_mean = self.add_weight(shape=shape, name="moving_mean",
                                           initializer=self.moving_mean_initializer,
                                           trainable=False, autocast=False)
        self.moving_variance = self.add_weight(shape=shape, name="moving_variance",
                                               initializer=self.moving_variance_initializer,
                                               trainable=False, autocast=False)
        self.input_spec = keras.layers.InputSpec(
            ndim=len(input_shape), axes={a: input_shape[a] for a in axes})
        self.built = True

    def compute_output_shape(self, input_shape):
        self._normalized_axes(len(input_shape))
        return input_shape

    # ---- the computation -------------------------------------------------------------

    def _communicator(self, like):
        if self.comm is None:
            return _comm.default(like)
        if self._resolved_comm is None:
            self._resolved_comm = _comm.as_communicator(self.comm, like)
        return self._resolved_comm

    def call(self, inputs, training=None, mask=None):
        batch_stats = bool(training) and self.trainable
        if mask is not None:
            if len(mask.shape) != len(inputs.shape) - 1:
                raise ValueError(f"mask: expected one dimension less than the inputs, got "
                                 f"mask.shape={tuple(mask.shape)}, inputs.shape="
                                 f"{tuple(inputs.shape)}")
        # As in Keras, a mask only changes the batch statistics: inference ignores it.
        if not batch_stats:
            mask = None
        if keras.backend.backend() == "jax":
            return self._call_jax(inputs, batch_stats, mask)
        from .torch import _sync_batch_norm

        x = inputs
        if not x.dtype.is_floating_point:
            x = ops.cast(x, "float32")
        comm = self._communicator(x) if batch_stats else _comm.local()

        def param(v):
            return None if v is None else v.value

        gamma, beta = param(self.gamma), param(self.beta)
        mm, mv = self.moving_mean.value, self.moving_variance.value
        axes = self._normalized_axes(x.ndim)
        mask = _core_mask(mask, x, axes)
        if len(axes) == 1:
            axis, xin = axes[0], x
        else:  # several axes: one channel axis of their product, then back
            rest = [d for d in range(x.ndim) if d not in axes]
            perm = rest + axes
            xin = x.permute(perm).reshape(math.prod(x.shape[d] for d in rest), -1)
            if mask is not None:
                mask = mask.permute(perm).reshape(xin.shape[0], -1)
            axis = 1
            gamma = None if gamma is None else gamma.reshape(-1)
            beta = None if beta is None else beta.reshape(-1)
            mm, mv = mm.view(-1), mv.view(-1)
        # Keras' momentum weighs the old value: PyTorch's factor is 1 - momentum.
        y, _ = _sync_batch_norm(xin, gamma, beta, mm, mv, batch_stats, 1.0 - self.momentum,
                                self.epsilon, comm, axis, False, self._layer_id, self.name, mask)
        if len(axes) > 1:
            inverse = [perm.index(d) for d in range(x.ndim)]
            y = y.reshape([x.shape[d] for d in perm]).permute(inverse)
        return ops.cast(y, self.compute_dtype)

    def _call_jax(self, inputs, batch_stats, mask):
        import jax.numpy as jnp

        from .jax import batch_norm

        # As keras.layers.BatchNormalization: compute in float32 at least.
        x = ops.cast(inputs, keras.backend.result_type(inputs.dtype, "float32"))
        gamma = None if self.gamma is None else self.gamma.value
        beta = None if self.beta is None else self.beta.value
        mm, mv = self.moving_mean.value, self.moving_variance.value
        axes = self._normalized_axes(x.ndim)
        mask = _core_mask(mask, x, axes)
        if len(axes) == 1:
            axis, xin = axes[0], x
        else:  # several axes: one channel axis of their product, then back
            rest = [d for d in range(x.ndim) if d not in axes]
            perm = rest + axes
            xin = jnp.transpose(x, perm).reshape(math.prod(x.shape[d] for d in rest), -1)
            if mask is not None:
                mask = jnp.transpose(mask, perm).reshape(xin.shape[0], -1)
            axis = 1
            gamma = None if gamma is None else gamma.reshape(-1)
            beta = None if beta is None else beta.reshape(-1)
            mm, mv = mm.reshape(-1), mv.reshape(-1)
        y, (new_mean, new_var) = batch_norm(
            xin, gamma, beta, (mm, mv), training=batch_stats, momentum=self.momentum,
            epsilon=self.epsilon, axis=axis, comm=self.comm, layer=self._layer_id,
            layer_name=self.name, mask=mask)
        if len(axes) > 1:
            inverse = [perm.index(d) for d in range(x.ndim)]
            y = jnp.transpose(y.reshape([x.shape[d] for d in perm]), inverse)
        if batch_stats:
            self.moving_mean.assign(new_mean.reshape(self.moving_mean.shape))
            self.moving_variance.assign(new_var.reshape(self.moving_variance.shape))
        return ops.cast(y, self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        for key in ("synchronized", "renorm", "renorm_clipping", "renorm_momentum"):
            config.pop(key, None)
        config["axis"] = self.axis
        return config
