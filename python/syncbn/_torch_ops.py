"""syncbn's SyncBN as torch.library custom ops, for graphs that torch.compile traces.

Functional ops (nothing is mutated: the new running statistics are returned and the
module copies them into its buffers, since an op that mutates its arguments cannot have
autograd), fake implementations for tracing, and autograd through register_autograd.
Communicators cannot be in a schema: an op takes a key into ``_COMMS`` (0: the default
communicator, resolved when the op runs).

Order. Compilers reorder independent ops (inductor's memory-driven reordering can put one
layer's collective before another's on one rank only), and effect annotations do not stop
it. So every collective-issuing op takes an ordering token and returns the next one:
  * forward: the token lives in a module-level variable that the module's forward reads
    and writes (dynamo makes it a graph input/output), so each layer's forward depends on
    the previous one's; it carries no gradient, so no autograd graph spans two steps;
  * backward: the backward formulas thread a second token while AOTAutograd traces them
    (scoped to the trace by its fake mode), so in the compiled backward graph each layer's
    backward depends on the one before it; each also takes its own forward's statistics.
Both chains follow program order, which is the same on every rank whatever its batch.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from . import _arrays, _core
from . import comm as _comm
from . import functional as _fn

_COMMS: dict = {}  # key -> [what the layer was given, {device: resolved communicator}]
_comm_keys = itertools.count(1)


def comm_key(obj) -> int:
    """A key for what a layer was given as its communicator (a syncbn, mpi4py or user
    communicator, or a torch.distributed group), kept here for the life of the process: a
    compiled graph names it by this number, and it is resolved when an op first runs on
    a device (so tracing does no communicator work). None: 0, the default communicator."""
    if obj is None:
        return 0
    for k, (o, _) in _COMMS.items():
        if o is obj:
            return k
    k = next(_comm_keys)
    _COMMS[k] = [obj, {}]
    return k


def _comm_of(key: int, like):
    if key == 0:
        return _comm.default(like)
    obj, by_device = _COMMS[key]
    dev = like.device
    c = by_device.get(dev)
    if c is None:
        dist = torch.distributed
        if dist.is_available() and isinstance(obj, dist.ProcessGroup):
            c = _comm._process_group(obj, like)
        else:
            c = _comm.as_communicator(obj, like)
        by_device[dev] = c
    return c


def _f64(n, like):
    return torch.empty(n, dtype=torch.float64, device=like.device)


# ---- the checked all-reduce of a payload ----------------------------------------------------


@torch.library.custom_op("syncbn::allreduce", mutates_args=())
def allreduce(payload: Tensor, count: float, comm_key: int, backward: bool, axis: int,
              layer: int, layer_name: str) -> tuple[Tensor, Tensor]:
    """(payload summed across the communicator, the global count): the core's checked
    all-reduce (count and fingerprint appended). A custom op so that even the legacy
    batching of ``is_grads_batched`` reaches it with real tensors (one call per slice)."""
    import numpy as np

    n = payload.numel()
    pad = n % 2  # the payload is 2P values
    buf = np.zeros(n + pad + 1 + _fn.FINGERPRINT_SLOTS, dtype=np.float64)
    buf[:n] = payload.reshape(-1).cpu().numpy()
    buf[n + pad] = count
    total = _core.allreduce_checked(buf, backward, axis, _comm_of(comm_key, payload), layer,
                                    layer_name, _fn.fingerprint_enabled())
    out = torch.from_numpy(buf[:n].copy()).reshape(payload.shape).to(payload.device)
    return out, torch.tensor(total, dtype=torch.float64, device=payload.device)


@allreduce.register_fake
def _(payload, count, comm_key, backward, axis, layer, layer_name):
    return torch.empty_like(payload), payload.new_empty(())


# ---- forward ------------------------------------------------------------------------------


@torch.library.custom_op("syncbn::batch_norm", mutates_args=())
def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None,
               running_mean: Tensor | None, running_var: Tensor | None, momentum: Tensor,
               token: Tensor, training: bool, eps: float, comm_key: int, layer: int,
               layer_name: str, axis: int, unbiased: bool
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, save_mean, save_invstd, count, new_running_mean, new_running_var, token).
    new_running_* are empty when running stats are not given."""
    C = x.shape[axis]
    y = torch.empty_like(x)
    mean, invstd = _f64(C, x), _f64(C, x)
    rm = running_mean.clone() if running_mean is not None else None
    rv = running_var.clone() if running_var is not None else None
    cuda = x.is_cuda
    save_count = _f64(1, x) if cuda else None
    comm = _comm_of(comm_key, x) if training else _comm.local()
    ex = _arrays.export
    n = _core.forward(ex(x), ex(weight), ex(bias), ex(rm), ex(rv), ex(y), ex(mean), ex(invstd),
                      training, float(momentum), eps, axis, comm, unbiased, ex(save_count),
                      _arrays.prepare(x), layer, layer_name, _fn.fingerprint_enabled())
    count = save_count if cuda else torch.tensor([n], dtype=torch.float64)
    return (y, mean, invstd, count, rm if rm is not None else x.new_empty(0),
            rv if rv is not None else x.new_empty(0), token + 1)


@batch_norm.register_fake
def _(x, weight, bias, running_mean, running_var, momentum, token, training, eps, comm_key,
      layer, layer_name, axis, unbiased):
    C = x.shape[axis]
    f64 = dict(dtype=torch.float64, device=x.device)
    return (torch.empty_like(x), x.new_empty(C, **f64), x.new_empty(C, **f64),
            x.new_empty(1, **f64),
            torch.empty_like(running_mean) if running_mean is not None else x.new_empty(0),
            torch.empty_like(running_var) if running_var is not None else x.new_empty(0),
            torch.empty_like(token))


# ---- backward -----------------------------------------------------------------------------


@torch.library.custom_op("syncbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(dy: Tensor, x: Tensor, weight: Tensor | None, save_mean: Tensor,
                        save_invstd: Tensor, count: Tensor, token: Tensor, training: bool,
                        comm_key: int, layer: int, layer_name: str, axis: int, need_dx: bool,
                        need_weight: bool, need_bias: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(dx, grad_weight, grad_bias, token); a gradient not asked for is empty."""
    C = x.shape[axis]
    dx = torch.empty_like(x) if need_dx else None
    like = weight if weight is not None else x.new_empty(C)
    dw = torch.empty_like(like) if need_weight else None
    db = torch.empty_like(like) if need_bias else None
    comm = _comm_of(comm_key, x) if training else _comm.local()
    ex = _arrays.export
    on_host = not count.is_cuda
    _core.backward(ex(dy), ex(x), ex(save_mean),
                   ex(save_invstd), ex(weight), ex(dx), ex(dw), ex(db), training,
                   float(count[0]) if on_host else float("nan"), axis, comm,
                   None if on_host else ex(count), _arrays.prepare(x), layer, layer_name,
                   _fn.fingerprint_enabled())
    def given(t):  # outputs may not alias each other: a fresh empty tensor each
        return t if t is not None else x.new_empty(0)

    return given(dx), given(dw), given(db), token + 1


@batch_norm_backward.register_fake
def _(dy, x, weight, save_mean, save_invstd, count, token, training, comm_key, layer,
      layer_name, axis, need_dx, need_weight, need_bias):
    like = weight if weight is not None else x.new_empty(x.shape[axis])
    dw = torch.empty_like(like) if need_weight else x.new_empty(0)
    db = torch.empty_like(like) if need_bias else x.new_empty(0)
    return (torch.empty_like(x) if need_dx else x.new_empty(0), dw, db, torch.empty_like(token))


# The backward token of the trace being built: (fake mode, token). Outside a trace (the ops
# called eagerly) each backward starts a fresh one; eager autograd runs in program order.
_bwd = [None, None]


def _backward_token(like):
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([like])
    if mode is None or _bwd[0] is not mode:
        _bwd[0], _bwd[1] = mode, torch.zeros((), dtype=torch.float64)
    return _bwd[1], mode


def _setup_context(ctx, inputs, output):
    (x, weight, bias, running_mean, running_var, momentum, token, training, eps, comm_key,
     layer, layer_name, axis, unbiased) = inputs
    y, mean, invstd, count, rm, rv, tok = output
    ctx.save_for_backward(x, weight, mean, invstd, count)
    ctx.attrs = (training, comm_key, layer, layer_name, axis, bias is not None)
    ctx.mark_non_differentiable(mean, invstd, count, rm, rv, tok)


def _backward(ctx, dy, *_):
    x, weight, mean, invstd, count = ctx.saved_tensors
    training, comm_key, layer, layer_name, axis, has_bias = ctx.attrs
    need_dx, need_w, need_b = ctx.needs_input_grad[:3]
    if dy is None:
        dy = torch.zeros_like(x)
    token, mode = _backward_token(dy)
    dx, dw, db, token = batch_norm_backward(
        dy, x, weight, mean, invstd, count, token, training, comm_key, layer, layer_name, axis,
        need_dx, need_w, need_b and has_bias)
    if mode is not None:
        _bwd[1] = token
    return (dx if need_dx else None, dw if need_w else None,
            db if need_b and has_bias else None) + (None,) * 11


batch_norm.register_autograd(_backward, setup_context=_setup_context)
