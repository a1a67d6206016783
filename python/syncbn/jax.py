"""SyncBN for JAX: batch norm with the statistics of the global batch across processes,
inside ``jax.jit``, ``jax.grad`` and ``jax.value_and_grad``, through XLA FFI.

    import syncbn.jax as sbj
    y, (mean, var) = sbj.batch_norm(x, scale, bias, (mean, var), training=True,
                                    momentum=0.99, epsilon=1e-5, axis=-1, comm=None)

Launch with ``mpiexec -n N python -m mpi4py train.py``: ``comm=None`` is MPI
``COMM_WORLD`` there (else a world of one). JAX is functional, so the running statistics
are returned, not updated in place. Flax's and Keras' convention by default
(``new = momentum * old + (1 - momentum) * batch``, biased variance);
``convention="torch"`` gives PyTorch's (``new = (1 - momentum) * old + momentum * batch``,
unbiased variance with the global count).

The forward and backward each run one all-reduce in training (none in eval) inside the
compiled program, in the core (C++; no Python on XLA's threads for MPI, NCCL and local
communicators). Every syncbn collective of a traced step takes a data dependency on the
previous one (an ordering token this module threads through the calls), so XLA cannot
run two of them in different orders on different ranks; a layer's backward also depends
on its own forward's saved statistics.
"""

from __future__ import annotations

import functools
import threading
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _core
from . import comm as _comm
from .functional import CollectiveMismatchError, fingerprint_enabled, new_layer_id

__all__ = ["batch_norm", "CollectiveMismatchError", "new_layer_id", "reset_ordering"]

_FORWARD, _BACKWARD = "syncbn_forward", "syncbn_backward"
_FLOATS = (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)

# ---- registration ------------------------------------------------------------------------

_registered = False
_lock = threading.Lock()


def _register() -> None:
    """Registers the FFI targets with jax (once per process)."""
    global _registered
    if _registered:
        return
    with _lock:
        if _registered:
            return
        info = _core.build_info()
        if not info.get("jax"):
            raise RuntimeError(
                "syncbn.jax: this build of syncbn has no XLA FFI handlers (built without the "
                "jaxlib headers; syncbn.build_info()['jax'] is False). Reinstall with "
                "SYNCBN_WITH_JAX=ON in the environment, e.g. "
                "SYNCBN_WITH_JAX=ON pip install -e '.[jax]' (see the README)")
        for platform, targets in _core.xla_handlers().items():
            jax.ffi.register_ffi_target(_FORWARD, targets["forward"], platform=platform)
            jax.ffi.register_ffi_target(_BACKWARD, targets["backward"], platform=platform)
        if "CUDA" in _core.xla_handlers() and _has_gpu():
            from . import _device

            _device.cuda()  # the core's CUDA backend, which the CUDA handlers call
        _registered = True


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


# ---- communicators -----------------------------------------------------------------------

# Communicators the compiled calls refer to by id: kept alive for the life of the
# process (a compiled executable may run at any time).
_comm_by_key: dict = {}  # id(the user's object) or None/"gpu" -> (object, communicator, id)


def _communicator_id(comm, platform: str) -> int:
    key = ("default", platform) if comm is None else id(comm)
    hit = _comm_by_key.get(key)
    if hit is not None and (comm is None or hit[0] is comm):
        return hit[2]
    if comm is None:
        c = _default_gpu() if platform == "gpu" else _comm.default()
    else:
        c = _comm.as_communicator(comm)
    cid = _core.xla_register_communicator(c)
    _comm_by_key[key] = (comm, c, cid)
    return cid


def _default_gpu():
    """comm=None for arrays on a GPU: NCCL bootstrapped from MPI COMM_WORLD when this build
    has it and the job has more than one rank, else the host default (staged). One GPU
    per process: the NCCL communicator is made for jax's first local device."""
    world = _comm.default()
    if world.size > 1 and getattr(world, "mpi4py_comm", None) is not None:
        from . import _device

        if _device.info()["nccl"]:
            dev = jax.local_devices()[0]
            return _comm.nccl(world.mpi4py_comm,
                              device=getattr(dev, "local_hardware_id", None) or 0)
    return world


# ---- the ordering token ------------------------------------------------------------------
#
# XLA runs independent ops concurrently (XLA:CPU even with side effects), so two syncbn
# collectives with no data dependency may run in different orders on different ranks. Each
# FFI call therefore takes a token (a float32 (1,) array whose value means nothing) and
# returns a new one; the next call of the same traced computation takes that one. The
# forward's token flows into the next layer; the backward of a layer takes the cotangent
# of its token output, which is what the backward of the next layer returned for its token
# input, so the backward collectives are chained in reverse order, after all forwards.
#
# The current token is kept per thread and per trace: a call takes the token of its own
# trace, else of the nearest enclosing one (e.g. the jit around a grad: the forwards of a
# second grad in one jit follow the backwards of the first), else starts from a constant.
# Only the tokens of the current trace and its ancestors are kept, so nothing of a
# finished trace outlives the next call.

_state = threading.local()


def _current_trace():
    try:
        from jax._src import core as jcore

        return jcore.trace_ctx.trace
    except Exception:  # jax moved it: every call then starts from a constant
        return None


def _ancestry(trace):
    for _ in range(256):
        if trace is None:
            return
        yield trace
        trace = getattr(trace, "parent_trace", None)


def _tokens() -> dict:
    tokens = getattr(_state, "tokens", None)
    if tokens is None:
        tokens = _state.tokens = {}
    return tokens


def _take_token():
    tokens = _tokens()
    for trace in _ancestry(_current_trace()):
        hit = tokens.get(id(trace))
        if hit is not None and hit[0] is trace:
            return hit[1]
    hit = tokens.get(None)  # a concrete token (eager calls) is usable anywhere
    return hit[1] if hit is not None else jnp.zeros((1,), jnp.float32)


def _put_token(tok) -> None:
    trace = getattr(tok, "_trace", None) if isinstance(tok, jax.core.Tracer) else None
    keep = {id(t) for t in _ancestry(trace)}
    tokens = {k: v for k, v in _tokens().items() if k is None or k in keep}
    tokens[None if trace is None else id(trace)] = (trace, tok)
    _state.tokens = tokens


def reset_ordering() -> None:
    """Forgets the current ordering tokens (the next syncbn call starts a new chain). Only
    needed to release traced values held after tracing (e.g. with
    ``jax_check_tracer_leaks``)."""
    _state.tokens = {}


# ---- the FFI calls -----------------------------------------------------------------------


class _Config(NamedTuple):
    axis: int
    training: bool
    momentum: float  # PyTorch's sense: the weight of the batch statistics
    eps: float
    unbiased: bool
    comm: int
    layer: int
    layer_name: str
    verify: bool


def _attrs(cfg: _Config, forward: bool) -> dict:
    a = dict(axis=np.int64(cfg.axis), training=bool(cfg.training), comm=np.int64(cfg.comm),
             layer=np.int64(cfg.layer), layer_name=str(cfg.layer_name),
             verify=bool(cfg.verify))
    if forward:
        a.update(momentum=np.float64(cfg.momentum), eps=np.float64(cfg.eps),
                 unbiased=bool(cfg.unbiased))
    return a


def _saved_len(C: int, counts: bool) -> int:
    # float64 [mean | invstd | count (| per-channel counts)] as uint32 pairs: no x64 needed
    return 2 * (2 * C + 1 + (C if counts else 0))


def _forward_call(x, scale, bias, mean, var, mask, token, cfg: _Config):
    C = x.shape[cfg.axis]
    counts = cfg.training and mask.ndim == x.ndim and mask.shape[cfg.axis] != 1
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(mean.shape, mean.dtype),
           jax.ShapeDtypeStruct(var.shape, var.dtype),
           jax.ShapeDtypeStruct((_saved_len(C, counts),), jnp.uint32),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    call = jax.ffi.ffi_call(_FORWARD, out, has_side_effect=True,
                            input_output_aliases={3: 1, 4: 2, 6: 4})
    return call(x, scale, bias, mean, var, mask, token, **_attrs(cfg, True))


def _backward_call(dy, x, scale, bias, mask, saved, token, cfg: _Config):
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype),
           jax.ShapeDtypeStruct(scale.shape, scale.dtype),
           jax.ShapeDtypeStruct(bias.shape, bias.dtype),
           jax.ShapeDtypeStruct((1,), jnp.float32))
    call = jax.ffi.ffi_call(_BACKWARD, out, has_side_effect=True, input_output_aliases={5: 3})
    return call(dy, x, scale, mask, saved, token, **_attrs(cfg, False))


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _bn(x, scale, bias, mean, var, mask, token, cfg):
    y, new_mean, new_var, _, token = _forward_call(x, scale, bias, mean, var, mask, token, cfg)
    return y, new_mean, new_var, token


def _bn_fwd(x, scale, bias, mean, var, mask, token, cfg):
    y, new_mean, new_var, saved, token = _forward_call(x, scale, bias, mean, var, mask, token,
                                                       cfg)
    # The saved statistics make the backward depend on this forward (on a rank with no
    # samples the backward's other inputs are constants).
    return (y, new_mean, new_var, token), (x, scale, bias, mean, var, mask, saved)


def _bn_bwd(cfg, res, cts):
    x, scale, bias, mean, var, mask, saved = res
    dy, _, _, dtoken = cts
    if cfg.training:
        # The cotangent chains this backward after the next layer's; the current token
        # orders it after any collective traced at this level since (e.g. a forward
        # between jax.vjp and the call of its function).
        token = dtoken + _take_token()
    else:
        token = jnp.zeros((1,), jnp.float32)
    dx, dscale, dbias, token = _backward_call(dy, x, scale, bias, mask, saved, token, cfg)
    if cfg.training:
        _put_token(token)
    else:
        token = jnp.zeros((1,), jnp.float32)
    return (dx, dscale, dbias, jnp.zeros_like(mean), jnp.zeros_like(var), jnp.zeros_like(mask),
            token)


_bn.defvjp(_bn_fwd, _bn_bwd)


# ---- the public function ---------------------------------------------------------------


def _platform(x) -> str:
    if isinstance(x, jax.core.Tracer):
        return jax.default_backend()
    try:
        return next(iter(x.devices())).platform
    except Exception:
        return jax.default_backend()


def _check_vector(v, name: str, C: int):
    if v is None:
        return None
    v = jnp.asarray(v)
    if v.shape != (C,):
        raise ValueError(f"{name}: expected shape ({C},) (the channel count of x), got "
                         f"{tuple(v.shape)}")
    if v.dtype not in _FLOATS:
        raise TypeError(f"{name}: expected a floating dtype, got {v.dtype}")
    return v


def _in_vmap() -> bool:
    t = _current_trace()
    while t is not None:
        if type(t).__name__ == "BatchTrace":
            return True
        t = getattr(t, "parent_trace", None)
    return False


def _core_mask(mask, x, axis: int):
    """``mask`` (broadcastable to x, as in flax) in x's dtype, as the core takes it: with 1
    at the channel axis when it does not vary along it (one count for every channel, the
    unmasked collective), else x's shape (a count per channel)."""
    mask = jnp.asarray(mask)
    try:
        ok = jnp.broadcast_shapes(mask.shape, x.shape) == x.shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask: expected a shape that broadcasts to x's {tuple(x.shape)}, got "
                         f"{tuple(mask.shape)}")
    k = axis - (x.ndim - mask.ndim)  # the mask's dimension along the channel axis, if any
    shape = x.shape
    if not (k >= 0 and mask.shape[k] != 1):
        shape = tuple(1 if d == axis else n for d, n in enumerate(x.shape))
    return jnp.broadcast_to(jnp.asarray(mask, bool), shape).astype(x.dtype)


def batch_norm(x, scale=None, bias=None, stats=None, *, training=True, momentum=0.99,
               epsilon=1e-5, axis=-1, comm=None, convention="flax", layer=0, layer_name="",
               mask=None):
    """Batch norm of ``x`` with the mean and variance of the global batch across ``comm``.

    Returns ``(y, new_stats)``. ``x``: rank >= 2, any channel ``axis``, float16, bfloat16,
    float32 (or float64 with ``jax_enable_x64``); statistics accumulate in float64. ``y``
    has x's dtype. ``scale``, ``bias``: (C,) or None. ``stats``: ``(mean, var)`` running
    statistics, each (C,) of a floating dtype (returned updated, same dtypes), or None
    (training only; ``new_stats`` is then None).

    ``training=True``: one all-reduce in the forward and one in the backward; ranks may
    hold any number of samples, 0 included (with a global batch of 0, ``y`` is empty and
    the statistics are returned unchanged; with a global batch of 1 every rank fails).
    ``training=False``: the running statistics normalize; nothing is communicated.

    ``convention``: ``"flax"`` (also Keras): ``new = momentum * old + (1 - momentum) *
    batch`` with the biased variance; ``"torch"``: ``new = (1 - momentum) * old +
    momentum * batch`` with the unbiased variance. ``epsilon`` is added to the variance.

    ``comm``: ``None`` (MPI ``COMM_WORLD`` under an MPI launcher with more than one rank,
    else a world of one; NCCL on GPUs when built), a :mod:`syncbn.comm` communicator, an
    mpi4py communicator (and its ``Split``), or an object with ``rank``, ``size`` and
    ``allreduce(buf)``. ``layer``/``layer_name``: the identity of the layer in the
    collective fingerprint and its name in errors (:func:`new_layer_id`; 0 for functional
    calls). Ranks that disagree fail with a ``jax.errors.JaxRuntimeError`` whose message
    starts with ``syncbn.CollectiveMismatchError``.

    ``mask`` (training; eval ignores it, as flax does): broadcastable to x, True (nonzero)
    where a position counts. The batch statistics are those of the counted positions of
    all ranks; every position is normalized with them (flax's and Keras' masked batch norm;
    the gradient is that of those statistics). A mask that does not vary along the channel
    axis (shape 1 there, or fewer dimensions) counts positions and may be absent on some
    ranks; one that varies along it counts per channel, and then every rank must pass one
    of that shape (the collective carries the C counts). A channel with nothing counted on
    any rank normalizes with mean 0 and variance 0 (Keras' result; flax's is NaN) and its
    running statistics are returned unchanged.

    Differentiable (``jax.grad``): gradients of x (the global one), scale and bias (this
    rank's, to be summed across ranks like any parameter gradient); none for the stats.
    """
    _register()
    if _in_vmap():
        raise NotImplementedError(
            "syncbn.jax.batch_norm under jax.vmap is not supported (every mapped slice would "
            "need its own collective); batch the data instead, or use flax's BatchNorm with "
            "axis_name inside the vmap")
    x = jnp.asarray(x)
    if x.dtype not in _FLOATS:
        raise TypeError(f"x: expected float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.ndim < 2:
        raise ValueError(f"x: expected at least 2 dimensions (N, C, ...), got shape "
                         f"{tuple(x.shape)}")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)):
        raise TypeError(f"axis: expected an int, got {type(axis).__name__}")
    if not -x.ndim <= int(axis) < x.ndim:
        raise ValueError(f"axis: expected an integer in [{-x.ndim}, {x.ndim}) for x of shape "
                         f"{tuple(x.shape)}, got {axis}")
    axis = int(axis) % x.ndim
    C = int(x.shape[axis])
    if convention not in ("flax", "keras", "torch"):
        raise ValueError(f"convention: expected 'flax' (also 'keras') or 'torch', got "
                         f"{convention!r}")
    momentum, epsilon = float(momentum), float(epsilon)
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum: expected a float in [0, 1], got {momentum}")
    if not 0.0 < epsilon < float("inf"):
        raise ValueError(f"epsilon: expected a finite float > 0, got {epsilon}")
    scale, bias = _check_vector(scale, "scale", C), _check_vector(bias, "bias", C)
    if stats is None:
        if not training:
            raise ValueError("stats: expected (mean, var) running statistics when "
                             "training=False, got None")
        mean, var = jnp.zeros((C,), jnp.float32), jnp.ones((C,), jnp.float32)
    else:
        try:
            mean, var = stats
        except (TypeError, ValueError):
            raise TypeError("stats: expected a pair (mean, var) or None") from None
        mean, var = _check_vector(mean, "stats[0] (mean)", C), \
            _check_vector(var, "stats[1] (var)", C)
    torch_sense = convention == "torch"
    cfg = _Config(axis=axis, training=bool(training),
                  momentum=momentum if torch_sense else 1.0 - momentum, eps=epsilon,
                  unbiased=torch_sense,
                  comm=_communicator_id(comm, _platform(x)) if training else 0,
                  layer=int(layer), layer_name=str(layer_name or ""),
                  verify=fingerprint_enabled())
    # Absent parameters are zero-length operands (their gradients too).
    pdt = x.dtype
    s = scale if scale is not None else jnp.zeros((0,), pdt)
    b = bias if bias is not None else jnp.zeros((0,), pdt)
    m = _core_mask(mask, x, axis) if (training and mask is not None) \
        else jnp.zeros((0,), x.dtype)
    token = _take_token() if training else jnp.zeros((1,), jnp.float32)
    y, new_mean, new_var, token = _bn(x, s, b, mean, var, m, token, cfg)
    if training:
        _put_token(token)
    return y, (None if stats is None else (new_mean, new_var))
