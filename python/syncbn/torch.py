"""PyTorch adapter: a drop-in SyncBatchNorm that also trains on CPU.

    import syncbn.torch as sbt
    model = sbt.convert_sync_batchnorm(model)   # every BatchNorm1d/2d/3d (and timm's)
    ...train with DDP or by hand, under mpiexec or torchrun, eager or torch.compile...
    model = sbt.revert_sync_batchnorm(model)    # plain BatchNorm for export

The module is a ``torch.nn.SyncBatchNorm`` (same parameters and buffers, so state dicts
load both ways with ``torch.nn.BatchNorm*d``). Training runs the core: one all-reduce of
2C+17 float64 values forward and one backward, whatever the world size. Which path runs:

* eager: the core's composed forward/backward behind a C++ autograd node on the CPU
  (libsyncbn_torch_eager, where built for this torch), else behind an autograd.Function;
  either backward is itself differentiable when a graph is built (``create_graph=True``);
* under torch.compile: the custom ops of ``syncbn._torch_ops`` (no graph break; an
  ordering token keeps every rank's collectives in one order);
* under torch.func transforms (vmap, jvp, grad) and forward-mode AD: a composition of
  torch ops around a differentiable all-reduce (slower, transform-friendly);
* eval, and anything else that does not synchronize: ``torch.nn.functional.batch_norm``,
  as ``torch.nn.SyncBatchNorm`` does.
"""

from __future__ import annotations

import collections
import sys
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from . import _arrays, _core
from . import _torch_ops as _ops
from . import comm as _comm
from . import functional as _fn

__all__ = ["SyncBatchNorm", "SyncBatchNormAct", "convert_sync_batchnorm",
           "revert_sync_batchnorm"]

_BATCHNORM_BY_DIM = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d,
                     4: torch.nn.BatchNorm2d, 5: torch.nn.BatchNorm3d}
_CONVERTIBLE = (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d, torch.nn.BatchNorm3d,
                torch.nn.SyncBatchNorm)


class _Shared:
    """Holds a communicator so that deepcopy (EMA models, ...) shares it instead of trying
    to copy a live MPI/NCCL handle, and pickling (torch.save of a whole module) drops it:
    a live handle means nothing in another process, which resolves the default again."""

    def __init__(self, value):
        self.value = value

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        return (_Shared, (None,))


# ---- eager: the core's composed forward/backward ------------------------------------------

_to_dlpack = torch.utils.dlpack.to_dlpack


def _export(t):
    return None if t is None else _to_dlpack(t)


_host_f64 = np.empty  # float64 by default
_grad_enabled = torch.is_grad_enabled
_NONE8 = (None,) * 8  # the gradients of the non-tensor arguments


class _SyncBatchNormFunction(torch.autograd.Function):
    """The fast path. ``info`` carries what the module needs back (the global count), the
    fingerprint's layer identity and an optional ``mask`` (ForwardOptions::mask: x's shape,
    or with 1 at the channel axis; x's dtype; Keras' masked statistics)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, comm, axis,
                unbiased, info):
        # Lean on purpose: a small layer's whole fwd+bwd is a few 10 us, so every Python
        # call here shows (NumPy arrays go to the core as they are, no export call).
        C = x.shape[axis]
        y = torch.empty_like(x)
        mask = info.get("mask")
        counts = _host_f64(C) if mask is not None and mask.shape[axis] != 1 else None
        if x.is_cuda:
            mean = torch.empty(C, dtype=torch.float64, device=x.device)
            invstd, save_count = torch.empty_like(mean), mean.new_empty(1)
            count = _core.forward(
                _to_dlpack(x), _export(weight), _export(bias), _export(running_mean),
                _export(running_var), _to_dlpack(y), _to_dlpack(mean), _to_dlpack(invstd), True,
                momentum, eps, axis, comm, unbiased, _to_dlpack(save_count), _arrays.prepare(x),
                info["layer"], info["name"], _fn._fingerprint, _export(mask), counts)
            count = save_count
        else:
            mean, invstd = _host_f64(C), _host_f64(C)
            batches = info.get("batches")  # num_batches_tracked: the core adds 1 on success
            if batches is not None:
                info["counted"] = True
                batches = _to_dlpack(batches)
            count = _core.forward(
                _to_dlpack(x), None if weight is None else _to_dlpack(weight),
                None if bias is None else _to_dlpack(bias),
                None if running_mean is None else _to_dlpack(running_mean),
                None if running_var is None else _to_dlpack(running_var), _to_dlpack(y), mean,
                invstd, True, momentum, eps, axis, comm, unbiased, None, 0, info["layer"],
                info["name"], _fn._fingerprint, None if mask is None else _to_dlpack(mask),
                counts, batches)
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, invstd, count, comm, axis, info["layer"], info["name"], unbiased, eps,
                     mask, counts)
        info["count"], info["mean"], info["invstd"] = count, mean, invstd
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        mean, invstd, count, comm, axis, layer, name, unbiased, eps, mask, counts = ctx.stats
        need_dx, need_w, need_b = ctx.needs_input_grad[:3]
        if _grad_enabled() or _is_wrapped(dy) or not _has_storage(dy) or (
                _forward_ad._current_level >= 0 and _transformed(dy)):
            if mask is not None:
                raise NotImplementedError(
                    "mask: masked statistics have no double backward or batched gradients "
                    "(the composition of torch ops is unmasked)")
            # A graph of the gradients is wanted (double backward) or dy is batched
            # (is_grads_batched): differentiate the composition of torch ops instead.
            return _composite_grads(dy, x, weight, bias, comm, axis, layer, name, unbiased, eps,
                                    (need_dx, need_w, need_b)) + _NONE8
        dx = torch.empty_like(x) if need_dx else None
        dw = torch.empty_like(weight) if need_w else None
        db = torch.empty_like(bias) if need_b else None
        if x.is_cuda:
            _core.backward(_to_dlpack(dy), _to_dlpack(x), _to_dlpack(mean), _to_dlpack(invstd),
                           _export(weight), _export(dx), _export(dw), _export(db), True,
                           float("nan"), axis, comm, _to_dlpack(count), _arrays.prepare(x),
                           layer, name, _fn._fingerprint, _export(mask), counts)
        else:
            _core.backward(_to_dlpack(dy), _to_dlpack(x), mean, invstd,
                           None if weight is None else _to_dlpack(weight),
                           None if dx is None else _to_dlpack(dx),
                           None if dw is None else _to_dlpack(dw),
                           None if db is None else _to_dlpack(db), True, count, axis, comm, None,
                           0, layer, name, _fn._fingerprint,
                           None if mask is None else _to_dlpack(mask), counts)
        return (dx, dw, db) + _NONE8


class _RecomputedFunction(torch.autograd.Function):
    """A forward that activation checkpointing recomputes: the global statistics of the
    first forward are reused (no collective, no running-stat update); the backward is the
    usual synchronized one."""

    @staticmethod
    def forward(ctx, x, weight, bias, mean, invstd, count, comm, axis, unbiased, layer, name,
                eps):
        y = torch.empty_like(x)
        _core.batch_norm_elemt(_to_dlpack(x), axis, _arrays.export(mean),
                               _arrays.export(invstd), _export(weight), _export(bias),
                               _to_dlpack(y), _arrays.prepare(x))
        ctx.save_for_backward(x, weight, bias)
        ctx.stats = (mean, invstd, count, comm, axis, layer, name, unbiased, eps, None, None)
        return y

    @staticmethod
    def backward(ctx, dy):
        return _SyncBatchNormFunction.backward(ctx, dy) + (None,)


# ---- eager on the CPU: the C++ autograd node, where it was built ---------------------------
#
# libsyncbn_torch_eager (bindings/torch_eager.cpp) is _SyncBatchNormFunction in C++: the
# same core calls, without a Python autograd node, whose Python costs a small layer more
# than its kernels inside a training step. Built against one torch (SYNCBN_WITH_TORCH at
# build time), so loaded only under that torch; SYNCBN_TORCH_EAGER=python keeps the Python
# Function. CUDA tensors, the Keras adapter and compiled autograd keep the Python Function.

_native_comms: dict = {}  # communicator -> its address, for the node
_native_by_address: dict = {}  # and back; both keep it alive while nodes may hold it


def _native_comm(comm) -> int:
    addr = _core.communicator_address(comm)
    _native_comms[comm] = addr
    _native_by_address[addr] = comm
    return addr


def _native_raise(error):
    _core.eager_raise(error)  # raises the failed call's exception
    raise RuntimeError("syncbn: eager_raise returned without raising")


def _native_composite_grads(dy, x, weight, bias, comm, layer, name, unbiased, eps, needs):
    grads = _composite_grads(dy, x, weight, bias, _native_by_address[comm], 1, layer, name,
                             unbiased, eps, tuple(needs))
    like = (x, weight, bias)
    return [torch.zeros_like(like[i]) if g is None else g
            for i, g in enumerate(grads) if needs[i]]


def _compiled_autograd() -> bool:
    """Whether compiled autograd may trace this forward's backward: the C++ node cannot be
    traced (its backward reads memory), the Python Function can (as an opaque call)."""
    ca = sys.modules.get("torch._dynamo.compiled_autograd")
    if ca is None:
        return False
    return ca.compiled_autograd_enabled or sys.modules["torch._dynamo.config"].compiled_autograd


def _load_native():
    """torch.ops.syncbn_eager.forward where the node was built against this torch; else
    None (the Python Function runs), with a warning if it was built against another."""
    import os

    want = os.environ.get("SYNCBN_TORCH_EAGER", "cpp").strip().lower()
    if want not in ("cpp", "python"):
        raise ValueError(f"SYNCBN_TORCH_EAGER: expected 'cpp' or 'python', got {want!r}")
    built = _core.build_info().get("torch")
    if want == "python" or built is None:
        return None, None
    if built != torch.__version__:
        warnings.warn(f"syncbn.torch: syncbn's C++ autograd node was built against torch "
                      f"{built}, not this torch {torch.__version__}; using the Python "
                      f"autograd.Function (same results, more time per call). Rebuild syncbn "
                      f"against this torch (see the README, 'Install') to get it back.",
                      stacklevel=3)
        return None, None
    torch.ops.load_library(os.path.join(os.path.dirname(_core.__file__),
                                        "libsyncbn_torch_eager.so"))
    torch.ops.syncbn_eager.init(_core.eager_table())
    lib = torch.library.Library("syncbn_eager", "IMPL")
    lib.impl("raise_error", _native_raise, "CompositeImplicitAutograd")
    # Batched: dy of is_grads_batched (and of vmap) reaches the composition as it is, whose
    # torch ops have batching rules, as the Python Function's backward does.
    for key in ("CompositeImplicitAutograd", "Batched", "FuncTorchBatched"):
        lib.impl("composite_grads", _native_composite_grads, key)
    # The overload's C++ callable (OpOverload.__call__ is a Python frame around it).
    return torch.ops.syncbn_eager.forward.default._op, lib


# ---- transforms: a composition of torch ops around a differentiable all-reduce ------------


_is_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
_is_batched = torch._C._functorch.is_batchedtensor


def _primal(t):
    """t's value without the wrappers of grad/jvp transforms (a vmapped one stays)."""
    while _is_wrapped(t) and not _is_batched(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t.detach()
_has_storage = torch._C._has_storage  # False for the batched grads of is_grads_batched
_forward_ad = torch.autograd.forward_ad


def _any_transformed(x, weight, bias) -> bool:
    """_transformed of any of the three, in one call (the eager path asks every forward)."""
    if _is_wrapped(x) or (weight is not None and _is_wrapped(weight)) or (
            bias is not None and _is_wrapped(bias)):
        return True
    return _forward_ad._current_level >= 0 and (_transformed(x) or _transformed(weight)
                                                or _transformed(bias))


def _transformed(t) -> bool:
    """Whether t is wrapped by a torch.func transform (vmap, grad, jvp) or is a dual tensor
    of forward-mode AD: the core cannot read such a tensor's memory."""
    if t is None:
        return False
    if _is_wrapped(t):
        return True
    return _forward_ad._current_level >= 0 and _forward_ad.unpack_dual(t).tangent is not None


class _AllReduce(torch.autograd.Function):
    """Sums a float64 payload (2P,) across the communicator of ``key`` (see
    syncbn._torch_ops) with the core's checked all-reduce. Its gradient and its tangent
    are the same sum; under vmap one collective carries the whole batch."""

    @staticmethod
    def forward(payload, count, key, backward, axis, layer, name):
        return _ops.allreduce(payload.contiguous(), float(count), key, backward, axis, layer,
                              name)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.args = inputs[1:]
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx, g, _):
        count, key, _bw, axis, layer, name = ctx.args
        return (_AllReduce.apply(g, count, key, True, axis, layer, name)[0],) + (None,) * 6

    @staticmethod
    def jvp(ctx, t, *_):
        count, key, _bw, axis, layer, name = ctx.args
        return _AllReduce.apply(t, count, key, False, axis, layer, name)[0], None

    @staticmethod
    def vmap(info, in_dims, payload, count, key, backward, axis, layer, name):
        p = payload.movedim(in_dims[0], 0) if in_dims[0] is not None else payload
        out, total = _AllReduce.apply(p.reshape(-1), count, key, backward, axis, layer, name)
        return (out.reshape(p.shape), total), (0 if in_dims[0] is not None else None, None)


def _composite(x, weight, bias, comm, axis, layer, name, eps, training, running_mean=None,
               running_var=None, momentum=0.0, unbiased=True):
    """SyncBN as torch ops (float64 statistics) around one differentiable all-reduce of
    [sum(x) | M2 + n*mean^2] per channel, the payload the core exchanges. Returns (y, N)."""
    C = x.shape[axis]
    if running_mean is not None and training and _is_batched(x) and not _is_batched(running_mean):
        raise RuntimeError(
            "SyncBatchNorm got a batched tensor as input (vmap) while running_mean and "
            "running_var, which are updated in place, are not batched; use "
            "track_running_stats=False, eval mode, or batched buffers (as torch's batch norm "
            "asks)")
    dims = [d for d in range(x.dim()) if d != axis]
    shape = [1] * x.dim()
    shape[axis] = C
    acc = torch.float64
    xd = x.to(acc)
    if training:
        n = x.numel() // C if C else 0
        s1 = xd.sum(dims)
        if n > 0:
            d = xd - (s1 / n).reshape(shape)
            s2 = (d * d).sum(dims) + s1 * s1 / n
        else:
            s2 = (xd * xd).sum(dims)
        sums, N = _AllReduce.apply(torch.cat([s1, s2]), n, _ops.comm_key(comm), False,
                                   axis % x.dim(), layer, name)
        Nf = float(N)
        if Nf == 0:
            return x * 0, 0.0
        if Nf == 1:
            raise ValueError("x: expected more than 1 value per channel when training, got a "
                             "global batch of 1 value per channel (all ranks together)")
        mean = sums[:C] / Nf
        var = (sums[C:] - sums[:C] * mean).clamp_min(0) / Nf
        if running_mean is not None:
            # Statistics of the primal values (under jvp/grad transforms the buffers are
            # captured: updated outside the transform, as torch's own batch norm does).
            m, v = _primal(mean), _primal(var) * (Nf / (Nf - 1) if unbiased else 1.0)
            with torch.no_grad(), torch._C._DisableFuncTorch():
                running_mean.mul_(1 - momentum).add_(m.to(running_mean.dtype), alpha=momentum)
                running_var.mul_(1 - momentum).add_(v.to(running_var.dtype), alpha=momentum)
    else:
        mean, var, Nf = running_mean.to(acc), running_var.to(acc), float(x.numel() // C)
    y = (xd - mean.reshape(shape)) * torch.rsqrt(var + eps).reshape(shape)
    if weight is not None:
        y = y * weight.to(acc).reshape(shape)
    if bias is not None:
        y = y + bias.to(acc).reshape(shape)
    return y.to(x.dtype), Nf


def _composite_grads(dy, x, weight, bias, comm, axis, layer, name, unbiased, eps, needs):
    """Gradients of the fast path's forward as a differentiable graph: the forward is
    redone as torch ops (its statistics synchronized again) and differentiated."""
    create = torch.is_grad_enabled()
    inputs = [t for t, n in zip((x, weight, bias), needs, strict=True) if n]
    with torch.enable_grad():
        leaves = [t if t.requires_grad else t.detach().requires_grad_() for t in inputs]
        it = iter(leaves)
        xs, ws, bs = (next(it) if n else t for t, n in zip((x, weight, bias), needs,
                                                           strict=True))
        y, _ = _composite(xs, ws, bs, comm, axis, layer, name, eps, True, unbiased=unbiased)
        grads = torch.autograd.grad(y, leaves, dy, create_graph=create, allow_unused=True)
    it = iter(grads)
    return tuple(next(it) if n else None for n in needs)


# ---- the module ---------------------------------------------------------------------------


_dist = torch.distributed if torch.distributed.is_available() else None
_cudnn = torch.backends.cudnn
_cpu_default = [False, None]  # (torch.distributed's WORLD group it was resolved under, comm)


def _momentum(momentum, nbt):
    """The running statistics' factor of a training step that updates them: none without a
    counter, the cumulative average (1 / (n + 1)) for momentum=None, else momentum."""
    if nbt is None:
        return 0.0
    if momentum is None:
        return 1.0 / float(nbt + 1)
    return momentum if type(momentum) is float else float(momentum)


def _default_comm(x):
    """comm.default(x), resolved again only when torch.distributed's default group changes
    (init/destroy_process_group; MPI's answer is fixed per process) - not on every call."""
    if x.is_cuda:
        return _comm.default(x)  # per device; cached there
    world = _dist.GroupMember.WORLD if _dist is not None else None
    c = _cpu_default
    if c[1] is None or c[0] is not world:
        c[0], c[1] = world, _comm.default(x)
    return c[1]


def _is_comm(obj) -> bool:
    """A syncbn communicator, an mpi4py communicator, or a user object - not a
    torch.distributed process group."""
    dist = torch.distributed
    if dist.is_available() and (isinstance(obj, dist.ProcessGroup)
                                or obj is dist.GroupMember.NON_GROUP_MEMBER):
        return False  # NON_GROUP_MEMBER: new_group's answer on a rank outside the group
    return obj is not None


class SyncBatchNorm(torch.nn.SyncBatchNorm):
    r"""Batch norm over (N, C, \*) inputs with the statistics of the global batch.

    The arguments of ``torch.nn.SyncBatchNorm`` (``process_group`` may also be a syncbn
    or mpi4py communicator, as may the keyword ``comm``: a syncbn communicator, an mpi4py
    communicator, or any object with ``rank``, ``size`` and ``allreduce(buf)``). With
    neither, the torch.distributed default group is used if initialized, else
    ``MPI.COMM_WORLD`` if it has more than one rank, else no communication.

    Training uses global batch statistics and updates the running ones (unbiased variance
    with the global count); eval uses the running statistics and never communicates;
    ``track_running_stats=False`` and ``momentum=None`` follow PyTorch's rules. Parameter
    gradients are local (DDP or your optimizer sums them); the input gradient is global.
    Unlike ``torch.nn.SyncBatchNorm`` it trains on CPU, under torch.compile without a
    graph break, under torch.func transforms and double backward, and under activation
    checkpointing (the recomputation reuses the first forward's statistics).
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None, *,
                 bias=True, comm=None):
        if process_group is not None and _is_comm(process_group):
            if comm is not None:
                raise ValueError("comm, process_group: expected at most one of them, got both")
            comm, process_group = process_group, None
        if comm is not None and process_group is not None:
            raise ValueError("comm, process_group: expected at most one of them, got both")
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         process_group, device=device, dtype=dtype, bias=bias)
        self._comm = _Shared(comm)
        self._resolved = _Shared(None)
        # How a compiled graph names this layer's communicator (0: the default one).
        self._comm_key = _ops.comm_key(comm if comm is not None else process_group)
        self._converted_from = None  # the class convert_sync_batchnorm replaced
        self._last_input_dim = None
        # Identity in collective fingerprints: the order layers are built in, the same on
        # every rank that builds the same model; the name (the module's path when
        # convert_sync_batchnorm made it) is for error messages.
        self.layer_id = _fn.new_layer_id()
        self.layer_name = ""
        # Global statistics of forwards that activation checkpointing may recompute.
        self._recompute = _Shared(collections.deque(maxlen=32))

    # The exception types torch's batch norm raises for the same input.
    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"input: expected at least 2D input (got {input.dim()}D input of "
                             f"shape {tuple(input.shape)}); expected (N, C, ...)")

    def _check_channels(self, input):
        if input.shape[1] != self.num_features:
            raise RuntimeError(f"input: expected {self.num_features} channels "
                               f"(num_features) along dim 1, got shape {tuple(input.shape)}")
        if not input.is_floating_point():
            raise NotImplementedError(f"input: expected a floating dtype (float16, bfloat16, "
                                      f"float32, float64), got {input.dtype}")

    def communicator(self, like=None):
        """The communicator training forwards use (resolved on first use); ``like``: an
        input, whose device picks NCCL for CUDA tensors on an NCCL process group."""
        if self._resolved.value is None:
            if self.process_group is not None:
                # CUDA inputs on an NCCL group: one NCCL communicator per group and device,
                # shared by every layer (not one per layer).
                self._resolved.value = _comm._process_group(self.process_group, like)
            elif self._comm.value is not None:
                self._resolved.value = _comm.as_communicator(self._comm.value, like)
            else:
                return _comm.default(like)  # cached; follows torch.distributed's state
        return self._resolved.value

    def forward(self, input):
        # Per call as little Python as torch.nn.BatchNorm2d's forward: no module
        # __setattr__, each parameter read once.
        nd = input.dim()
        d = self.__dict__
        if d["_last_input_dim"] != nd:  # the rank check (a subclass's too) once per rank
            self._check_input_dim(input)
            d["_last_input_dim"] = nd
        C = input.shape[1]
        if C != self.num_features:
            self._check_non_zero_input_channels(input)
            self._check_channels(input)
        if not input.is_floating_point():
            self._check_channels(input)
        # Parameters and buffers straight from their dicts: Module.__getattr__ costs a
        # Python call each (a parametrized one is a property, so fall back to getattr).
        p = d["_parameters"]
        weight = p["weight"] if "weight" in p else self.weight
        bias = p["bias"] if "bias" in p else self.bias
        if not self.training:  # eval: no synchronization; torch's own batch norm
            b = d["_buffers"]
            rm = b["running_mean"] if "running_mean" in b else self.running_mean
            rv = b["running_var"] if "running_var" in b else self.running_var
            if rm is None or rv is None or not self.eps >= 0:  # F.batch_norm's checks
                return F.batch_norm(input, rm, rv, weight, bias, rm is None and rv is None,
                                    0.0, self.eps)
            return torch.batch_norm(input, weight, bias, rm, rv, False, 0.0, self.eps,
                                    _cudnn.enabled)
        if self.eps <= 0:
            raise ValueError(f"batch_norm eps must be positive during training, but got "
                             f"{self.eps}")
        update = self.track_running_stats
        if torch.compiler.is_compiling():
            return self._forward_compiled(input, update)
        try:
            if _any_transformed(input, weight, bias):
                return self._forward_composite(input, update)
            return self._forward_eager(input, weight, bias, update)
        except (ValueError, TypeError) as e:
            raise _as_torch_error(e) from None

    def _forward_eager(self, input, weight, bias, update):
        d = self.__dict__
        b = d["_buffers"]
        nbt = b.get("num_batches_tracked")
        if update:
            rm = b["running_mean"] if "running_mean" in b else self.running_mean
            rv = b["running_var"] if "running_var" in b else self.running_var
            momentum = _momentum(self.momentum, nbt)
        else:
            rm = rv = None
            momentum = 0.0
        comm = d["_resolved"].value or (_default_comm(input) if self.process_group is None
                                        and d["_comm"].value is None
                                        else self.communicator(input))
        # Activation checkpointing: a recomputation reuses the first forward's statistics.
        saved = d["_recompute"].value
        if saved and _recomputing():
            for i in range(len(saved) - 1, -1, -1):
                shape, mean, invstd, count, c = saved[i]
                if shape == input.shape and c is comm:
                    del saved[i]
                    return _RecomputedFunction.apply(input, weight, bias, mean, invstd, count,
                                                     comm, 1, True, self.layer_id,
                                                     self.layer_name, self.eps)
        step = nbt if update and nbt is not None else None
        # num_batches_tracked: the core adds 1 on success where it can (one int64 on the CPU).
        batches = step if step is not None and step.dtype is torch.long and not step.is_cuda \
            else None
        if _native is not None and input.is_cpu and not _compiled_autograd():
            addr = _native_comms.get(comm)
            if addr is None:
                addr = _native_comm(comm)
            y, mean, invstd, count = _native(input, weight, bias, rm, rv, batches, momentum,
                                             self.eps, addr, self.layer_id, self.layer_name,
                                             _fn._fingerprint, True)
            counted = batches is not None
        else:
            info = {"layer": self.layer_id, "name": self.layer_name, "batches": batches}
            y = _SyncBatchNormFunction.apply(input, weight, bias, rm, rv, momentum, self.eps,
                                             comm, 1, True, info)
            mean, invstd, count = info["mean"], info["invstd"], info["count"]
            counted = "counted" in info
        if not _grad_enabled() or (_top_hooks(True) and _may_be_recomputed()):
            saved.append((input.shape, mean, invstd, count, comm))
        # Only after a successful call (a failed one leaves every buffer as it was); an
        # all-empty step counts, as in torch's BatchNorm and SyncBatchNorm (its running
        # stats stay as they were). On the CPU the core has counted it already.
        if step is not None and not counted:
            step.add_(1)
        return y

    def _forward_composite(self, input, update):
        comm = self.communicator(input)
        y, _ = _composite(input, self.weight, self.bias, comm, 1, self.layer_id,
                          self.layer_name, self.eps, True,
                          self.running_mean if update else None,
                          self.running_var if update else None,
                          _momentum(self.momentum, self.num_batches_tracked) if update else 0.0)
        if update and self.num_batches_tracked is not None:
            with torch.no_grad(), torch._C._DisableFuncTorch():  # a captured buffer
                self.num_batches_tracked.add_(1)
        return y

    def _forward_compiled(self, input, update):
        global _TOKEN
        nbt = self.num_batches_tracked
        if update and self.momentum is None and nbt is not None:
            momentum = 1.0 / (nbt + 1).to(torch.float64)
        else:
            momentum = torch.tensor(float(self.momentum or 0.0) if update else 0.0,
                                    dtype=torch.float64)
        y, _, _, _, rm, rv, _TOKEN = _ops.batch_norm(
            input, self.weight, self.bias, self.running_mean if update else None,
            self.running_var if update else None, momentum, _TOKEN, True, self.eps,
            self._comm_key, self.layer_id, self.layer_name, 1, True)
        if update:
            with torch.no_grad():
                self.running_mean.copy_(rm)
                self.running_var.copy_(rv)
                if nbt is not None:
                    nbt.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module, process_group=None):
        """``torch.nn.SyncBatchNorm.convert_sync_batchnorm``'s signature, making syncbn's
        layers (see :func:`convert_sync_batchnorm`)."""
        return convert_sync_batchnorm(module, process_group)

    def extra_repr(self):
        return super().extra_repr() + (f", comm={self._comm.value!r}"
                                       if self._comm.value is not None else "")


def _let_ddp_take_syncbn_on_cpu():
    """DistributedDataParallel refuses CPU modules holding a torch.nn.SyncBatchNorm,
    because torch's own cannot run there; syncbn's layers are torch.nn.SyncBatchNorm
    instances that can. The check keeps refusing torch's own class and lets syncbn's
    through (if torch renames the method, nothing is changed)."""
    ddp = torch.nn.parallel.DistributedDataParallel
    orig = getattr(ddp, "_passing_sync_batchnorm_handle", None)
    if orig is None or getattr(orig, "_syncbn", False):
        return

    def _passing_sync_batchnorm_handle(self, module):
        for layer in module.modules():
            if isinstance(layer, torch.nn.SyncBatchNorm) and not isinstance(
                    layer, SyncBatchNorm) and self.device_type == "cpu":
                self._log_and_throw(ValueError, "SyncBatchNorm layers only work with GPU modules")

    _passing_sync_batchnorm_handle._syncbn = True
    ddp._passing_sync_batchnorm_handle = _passing_sync_batchnorm_handle


_let_ddp_take_syncbn_on_cpu()

_native, _native_lib = _load_native()

# The forward ordering token of the compiled path (see syncbn._torch_ops); no gradient.
_TOKEN = torch.zeros((), dtype=torch.float64)


def _as_torch_error(e):
    """The core names bad parameters and buffers with ValueError/TypeError; torch's batch
    norm raises RuntimeError for them, so the module does too (same message)."""
    msg = str(e)
    if msg.startswith(("running_mean:", "running_var:", "weight:", "bias:")):
        return RuntimeError(msg)
    return e


def _recomputing() -> bool:
    """Whether this forward is activation checkpointing's recomputation: inside a backward
    (reentrant checkpoint) or under the non-reentrant checkpoint's recomputation hooks."""
    if torch._C._current_graph_task_id() != -1 and torch.is_grad_enabled():
        return True
    return "_recomputation_hook" in _top_pack_hook()


def _may_be_recomputed() -> bool:
    """Whether this training forward runs inside a checkpointed region: without grad
    (reentrant checkpoint's first pass) or under the non-reentrant checkpoint's hooks."""
    return not torch.is_grad_enabled() or "_checkpoint_hook" in _top_pack_hook()


_top_hooks = torch._C._autograd._top_saved_tensors_default_hooks


def _top_pack_hook() -> str:
    hooks = _top_hooks(True)
    return getattr(hooks[0], "__qualname__", "") if hooks else ""


# ---- conversion -----------------------------------------------------------------------------


def _copy_state(src, dst):
    """Shares src's parameters and buffers with dst and copies its mode (like torch's
    convert_sync_batchnorm, so optimizers holding the parameters keep working)."""
    if src.affine:
        dst.weight = src.weight
        dst.bias = src.bias
    if src.track_running_stats:
        dst.running_mean = src.running_mean
        dst.running_var = src.running_var
        dst.num_batches_tracked = src.num_batches_tracked
    dst.train(src.training)
    if hasattr(src, "qconfig"):
        dst.qconfig = src.qconfig
    return dst


class SyncBatchNormAct(SyncBatchNorm):
    """A :class:`SyncBatchNorm` followed by timm's drop and activation: what
    :func:`convert_sync_batchnorm` makes of ``timm.layers.BatchNormAct2d`` (and its
    relatives), keeping their ``drop`` and ``act`` modules."""

    def forward(self, input):
        x = super().forward(input)
        x = self.drop(x)
        return self.act(x)


def _timm_norm_act():
    try:
        from timm.layers import norm_act
    except ImportError:
        return ()
    return tuple(c for c in (getattr(norm_act, n, None) for n in (
        "BatchNormAct2d", "SyncBatchNormAct")) if isinstance(c, type))


def convert_sync_batchnorm(module, process_group=None, *, comm=None, _path=""):
    """Replaces every ``torch.nn.BatchNorm1d/2d/3d`` and ``torch.nn.SyncBatchNorm`` in
    ``module`` with :class:`SyncBatchNorm`, and timm's ``BatchNormAct2d`` (and
    ``SyncBatchNormAct``) with :class:`SyncBatchNormAct`, keeping parameters, buffers,
    training flag, device, dtype, ``bias=False``, and timm's activation and drop. Other
    subclasses of those are left alone, with a warning naming them. ``process_group``:
    a torch.distributed group, as in torch (a syncbn or mpi4py communicator works too).
    Each new layer is named by its path in ``module`` in collective errors."""
    if process_group is not None and _is_comm(process_group):
        if comm is not None:
            raise ValueError("comm, process_group: expected at most one of them, got both")
        comm, process_group = process_group, None
    out = module
    timm = _timm_norm_act()
    kind = type(module)
    if kind in _CONVERTIBLE or kind in timm:
        cls = SyncBatchNormAct if kind in timm else SyncBatchNorm
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats, process_group,
                  bias=getattr(module, "bias", None) is not None or not module.affine,
                  comm=comm)
        _copy_state(module, out)
        if kind in timm:
            out.drop, out.act = module.drop, module.act
        out._converted_from = (None if kind is torch.nn.SyncBatchNorm else
                               timm[0] if kind in timm else kind)  # timm: BatchNormAct2d
        out.layer_name = _path or kind.__name__
    elif isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        warnings.warn(f"convert_sync_batchnorm: left {type(module).__qualname__} unconverted: "
                      "it subclasses a torch batch norm class, and only the exact classes "
                      "(and timm's BatchNormAct2d) are converted (its overrides would be lost)",
                      stacklevel=2)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, process_group, comm=comm,
                                                    _path=f"{_path}.{name}" if _path else name))
    return out


def revert_sync_batchnorm(module):
    """Replaces every :class:`SyncBatchNorm` with the class it was converted from (a
    ``torch.nn.BatchNorm*d`` or timm's ``BatchNormAct2d``); for one built directly, by the
    input rank it last saw (2-3: 1d, 4: 2d, 5: 3d), and ``BatchNorm2d`` if it never saw
    an input."""
    out = module
    if isinstance(module, SyncBatchNorm):
        cls = module._converted_from or _BATCHNORM_BY_DIM.get(module._last_input_dim,
                                                              torch.nn.BatchNorm2d)
        bias = module.bias is not None or not module.affine
        if cls in _timm_norm_act():
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, apply_act=False, drop_layer=None)
            out.act, out.drop = module.act, module.drop
        else:
            out = cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, bias=bias)
        _copy_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out


# ---- the Keras adapter's entry --------------------------------------------------------------


def _sync_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                     comm, axis=1, unbiased=True, layer=0, layer_name="", mask=None):
    """Returns (y, global count): batch statistics synchronized over ``comm`` when
    ``training``, else the running statistics (no communication). Any channel axis;
    ``unbiased=False`` updates the running variance with the biased one (Keras). ``mask``
    (training): the statistics of the elements where it is nonzero (x's shape, or with 1
    at the channel axis; see ForwardOptions::mask)."""
    if not training:
        y, ctx = _fn.batch_norm_forward(x, weight, bias, running_mean, running_var,
                                        training=False, eps=eps, axis=axis,
                                        comm=_comm.local())
        return y, ctx.count
    if mask is not None:
        if _transformed(x):
            raise NotImplementedError("mask: masked statistics under torch.func transforms "
                                      "or forward-mode AD are not supported")
        mask = mask.to(x.dtype).contiguous()
    if _transformed(x):
        return _composite(x, weight, bias, comm, axis, layer, layer_name, eps, True,
                          running_mean, running_var, momentum, unbiased)
    info = {"layer": layer, "name": layer_name, "mask": mask}
    y = _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, momentum,
                                     eps, comm, axis, unbiased, info)
    return y, info["count"]
