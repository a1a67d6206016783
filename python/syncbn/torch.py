"""PyTorch adapter: a drop-in SyncBatchNorm that also trains on CPU.

    import syncbn.torch as sbt
    model = sbt.convert_sync_batchnorm(model)   # every BatchNorm1d/2d/3d
    ...train with DDP or by hand, under mpiexec or torchrun...
    model = sbt.revert_sync_batchnorm(model)    # plain BatchNorm for export

The module is a ``torch.nn.modules.batchnorm._BatchNorm`` (same parameters and buffers,
so state dicts load both ways with ``torch.nn.BatchNorm*d``). Its autograd function runs
the core's composed forward/backward: one all-reduce of 2C+1 float64 values forward, one
of 2C backward, whatever the world size.
"""

from __future__ import annotations

import warnings

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from . import comm as _comm
from .functional import BatchNormContext, batch_norm_backward, batch_norm_forward, new_layer_id

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "revert_sync_batchnorm"]

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


class _SyncBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps,
                comm, axis, unbiased, info):
        y, c = batch_norm_forward(x, weight, bias, running_mean, running_var,
                                  training=training, momentum=momentum, eps=eps, axis=axis,
                                  comm=comm, unbiased_running_var=unbiased,
                                  layer=info["layer"], layer_name=info["name"])
        ctx.save_for_backward(x, weight, bias)
        # BatchNormContext's fields after x, weight, bias (those are saved tensors).
        ctx.stats = (c.mean, c.invstd, c.count, c.axis, c.training, c.comm, c.layer,
                     c.layer_name)
        info["count"] = c.count
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensors
        c = BatchNormContext(x, weight, bias, *ctx.stats)
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        dx, dw, db = batch_norm_backward(dy, c, need_dx=need_dx)
        return (dx, dw if need_dw else None, db if need_db else None) + (None,) * 9


@torch.compiler.disable
def _sync_batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps,
                     comm, axis=1, unbiased=True, layer=0, layer_name=""):
    """Returns (y, global count). A graph break under torch.compile: the collective and
    the C++ kernels run eagerly. Also the Keras adapter's entry (any axis, biased var).
    ``layer``, ``layer_name``: the layer's identity in collective fingerprints."""
    info = {"layer": layer, "name": layer_name}
    y = _SyncBatchNormFunction.apply(x, weight, bias, running_mean, running_var, training,
                                     momentum, eps, comm, axis, unbiased, info)
    return y, info["count"]


class SyncBatchNorm(_BatchNorm):
    r"""Batch norm over (N, C, \*) inputs with the statistics of the global batch.

    Same arguments as ``torch.nn.SyncBatchNorm`` plus ``comm``: a syncbn communicator,
    an mpi4py communicator, or any object with ``rank``, ``size`` and ``allreduce(buf)``.
    ``process_group`` (a torch.distributed group) is accepted for drop-in compatibility.
    With neither, the torch.distributed default group is used if initialized, else
    ``MPI.COMM_WORLD`` if it has more than one rank, else no communication.

    Training uses global batch statistics and updates the running ones (unbiased variance
    with the global count); eval uses the running statistics and never communicates;
    ``track_running_stats=False`` and ``momentum=None`` follow PyTorch's rules. Parameter
    gradients are local (DDP or your optimizer sums them); the input gradient is global.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, comm=None, process_group=None, device=None,
                 dtype=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        if comm is not None and process_group is not None:
            raise ValueError("comm, process_group: expected at most one of them, got both")
        self._comm = _Shared(comm)
        self.process_group = process_group
        self._resolved = _Shared(None)
        self._converted_from = None  # the torch.nn class convert_sync_batchnorm replaced
        self._last_input_dim = None
        # Identity in collective fingerprints: the order layers are built in, the same on
        # every rank that builds the same model; the name (the module's path when
        # convert_sync_batchnorm made it) is for error messages.
        self.layer_id = new_layer_id()
        self.layer_name = ""

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"input: expected at least 2 dimensions (N, C, ...), got "
                             f"{input.dim()}-D input of shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(f"input: expected {self.num_features} channels (num_features) "
                             f"along dim 1, got shape {tuple(input.shape)}")

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
                return _comm.default(like)  # follows torch.distributed initialized later
        return self._resolved.value

    def forward(self, input):
        self._check_input_dim(input)
        # PyTorch's _BatchNorm rules for the averaging factor and which stats to use.
        factor = 0.0 if self.momentum is None else self.momentum
        update = self.training and self.track_running_stats
        if update and self.num_batches_tracked is not None and self.momentum is None:
            factor = 1.0 / float(self.num_batches_tracked + 1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        use_running = not self.training or self.track_running_stats
        comm = self.communicator(input) if bn_training and self.training else _comm.local()
        y, count = _sync_batch_norm(input, self.weight, self.bias,
                                    self.running_mean if use_running else None,
                                    self.running_var if use_running else None,
                                    bn_training, factor, self.eps, comm, 1, True,
                                    self.layer_id, self.layer_name)
        # Only after a successful call that saw data (all ranks agree on the global count):
        # a failed or all-empty step leaves every buffer as it was. On a device the count
        # stays there (no host sync): counted like PyTorch, empty steps included.
        if update and self.num_batches_tracked is not None and (
                not isinstance(count, float) or count > 0):
            self.num_batches_tracked.add_(1)
        self._last_input_dim = input.dim()
        return y

    def extra_repr(self):
        return super().extra_repr() + (f", comm={self._comm.value!r}"
                                       if self._comm.value is not None else "")


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


def convert_sync_batchnorm(module, comm=None, process_group=None, _path=""):
    """Replaces every ``torch.nn.BatchNorm1d/2d/3d`` (and ``torch.nn.SyncBatchNorm``) in
    ``module`` with :class:`SyncBatchNorm`, keeping parameters, buffers, training flag,
    device and dtype. Subclasses of those are left alone, with a warning naming them.
    Each new layer is named by its path in ``module`` in collective errors."""
    out = module
    if type(module) in _CONVERTIBLE:
        out = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, comm=comm, process_group=process_group)
        _copy_state(module, out)
        out._converted_from = (type(module) if type(module) is not torch.nn.SyncBatchNorm
                               else None)
        out.layer_name = _path or type(module).__name__
    elif isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        warnings.warn(f"convert_sync_batchnorm: left {type(module).__qualname__} unconverted: "
                      "it subclasses a torch batch norm class, and only the exact classes "
                      "are converted (its overrides would be lost)", stacklevel=2)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, comm, process_group,
                                                    f"{_path}.{name}" if _path else name))
    return out


def revert_sync_batchnorm(module):
    """Replaces every :class:`SyncBatchNorm` with the ``torch.nn.BatchNorm*d`` it was
    converted from; for one built directly, by the input rank it last saw (2-3: 1d,
    4: 2d, 5: 3d), and ``BatchNorm2d`` if it never saw an input."""
    out = module
    if isinstance(module, SyncBatchNorm):
        cls = module._converted_from or _BATCHNORM_BY_DIM.get(module._last_input_dim,
                                                              torch.nn.BatchNorm2d)
        out = cls(module.num_features, module.eps, module.momentum, module.affine,
                  module.track_running_stats)
        _copy_state(module, out)
    for name, child in module.named_children():
        out.add_module(name, revert_sync_batchnorm(child))
    return out
