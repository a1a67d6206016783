"""Communicators: who SyncBN sums its statistics with.

A communicator is anything with integer ``rank`` and ``size`` and an in-place sum
all-reduce. Built in: :func:`local` (a world of one) and :func:`mpi` (an mpi4py
communicator, sub-communicators from ``Split`` included). Any Python object with integer
``rank``/``size`` attributes and a method ``allreduce(buf)`` that sums a 1-D float64
NumPy array in place across ranks works too.
"""

from __future__ import annotations

import os
import sys

from . import _core

__all__ = ["Communicator", "local", "mpi", "nccl", "torch_distributed", "split",
           "as_communicator", "default"]

Communicator = _core.Communicator

# Environment variables that the common launchers set in every rank (MPICH/Hydra, Open
# MPI, PMIx, Slurm).
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS")


def local() -> Communicator:
    """A communicator of size 1: SyncBN becomes plain batch norm, nothing is sent."""
    return _core.LocalCommunicator()


def _check_same_mpi(MPI) -> None:
    info = _core.build_info()
    if not info["mpi"]:
        raise RuntimeError(
            "comm: syncbn was built without MPI (SYNCBN_WITH_MPI resolved OFF), so an mpi4py "
            "communicator cannot be used; reinstall syncbn where mpi.h and libmpi are found "
            "(the 'mpich' wheel provides them) or pass an object with rank, size and "
            "allreduce(buf)"
        )
    ours = info["mpi_library_version"].strip()
    theirs = MPI.Get_library_version().strip()
    if ours != theirs:
        first = lambda s: s.splitlines()[0] if s else "?"  # noqa: E731
        raise RuntimeError(
            "comm: syncbn was built against a different MPI than the one mpi4py loaded "
            f"(syncbn: {first(ours)!r}; mpi4py: {first(theirs)!r}). Their communicator "
            "handles are not interchangeable; install both against the same MPI, e.g. "
            "`pip install --force-reinstall --no-cache-dir mpich mpi4py syncbn`."
        )


def _timeout(timeout) -> float:
    if timeout is None:
        env = os.environ.get("SYNCBN_COLLECTIVE_TIMEOUT", "").strip()
        if not env:
            return 0.0
        try:
            timeout = float(env)
        except ValueError:
            raise ValueError(f"SYNCBN_COLLECTIVE_TIMEOUT: expected seconds (a number >= 0), "
                             f"got {env!r}") from None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or \
            not 0 <= timeout <= 1e9:
        raise ValueError(f"timeout: expected seconds >= 0 (0: wait forever) or None, got "
                         f"{timeout!r}")
    return float(timeout)


def mpi(comm=None, *, timeout=None) -> Communicator:
    """The MPI communicator of an mpi4py ``comm`` (default ``MPI.COMM_WORLD``).

    The all-reduce runs in the compiled core with the GIL released. ``comm`` is kept
    alive (not duplicated) for as long as the returned communicator is.

    ``timeout`` (seconds; default ``SYNCBN_COLLECTIVE_TIMEOUT`` from the environment, else
    none): an all-reduce still waiting for another rank after that long raises
    ``RuntimeError`` naming the layer, instead of waiting forever for a rank that exited
    or skipped collectives; under ``python -m mpi4py`` that ends the whole job.
    """
    from mpi4py import MPI

    if comm is None:
        comm = MPI.COMM_WORLD
    if not isinstance(comm, MPI.Comm):
        raise TypeError(f"comm: expected an mpi4py communicator (mpi4py.MPI.Comm), got "
                        f"{type(comm).__name__}")
    if comm == MPI.COMM_NULL:
        raise ValueError("comm: expected a valid MPI communicator, got MPI.COMM_NULL")
    if not isinstance(comm, MPI.Intracomm) or comm.Is_inter():
        raise TypeError("comm: expected an intra-communicator, got an inter-communicator")
    timeout = _timeout(timeout)
    _check_same_mpi(MPI)
    c = _core.MpiCommunicator(MPI._handleof(comm), timeout)
    c.mpi4py_comm = comm  # keeps the handle valid
    return c


class _TorchDistributed:
    """torch.distributed as a communicator: the buffer is shared with a tensor (no copy)
    and summed with ``all_reduce`` on ``group``. An NCCL group sums CUDA tensors only, so
    there the host buffer goes through one on the current device (correct, not fast: for
    CUDA inputs on an NCCL group syncbn makes an NCCL communicator instead)."""

    def __init__(self, group):
        import torch
        import torch.distributed as dist

        self._dist, self.group = dist, group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self._device = (torch.device("cuda", torch.cuda.current_device())
                        if dist.get_backend(group) == "nccl" else None)

    def allreduce(self, buf):
        import torch

        t = torch.from_numpy(buf)
        if self._device is None:
            self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
            return
        d = t.to(self._device)
        self._dist.all_reduce(d, op=self._dist.ReduceOp.SUM, group=self.group)
        t.copy_(d)  # waits for the sum

    def __repr__(self):
        return f"<torch.distributed communicator rank={self.rank} size={self.size}>"


def torch_distributed(group=None) -> Communicator:
    """A communicator over a torch.distributed process group (default: the default
    group), e.g. gloo on CPU. torch.distributed must be initialized."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("comm: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first (or use comm.mpi())")
    if group is not None and group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: this rank is not a member of the given process group")
    c = _core.PythonCommunicator(_TorchDistributed(group))
    return c


def _current_cuda_device() -> int:
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return torch.cuda.current_device()
    cupy = sys.modules.get("cupy")
    if cupy is not None:
        return cupy.cuda.Device().id
    return 0


def nccl(comm=None, *, group=None, device=None) -> Communicator:
    """An NCCL communicator: the all-reduce runs on the caller's CUDA stream (no host
    sync, CUDA-graph capturable). Bootstrapped from an mpi4py communicator ``comm``
    (default ``MPI.COMM_WORLD``) or from a torch.distributed ``group`` (rank 0's unique id
    is broadcast over it). ``device``: the CUDA device index (default: the current one).
    Collective: every rank of ``comm``/``group`` must call it."""
    from . import _device

    cuda = _device.cuda()
    if not cuda.nccl:
        raise RuntimeError("comm: this build of syncbn has no NCCL (install the `cuda` extra, "
                           "nvidia-nccl-cu13, or a system NCCL, then rebuild); "
                           "syncbn.build_info()['nccl'] says so")
    if comm is not None and group is not None:
        raise ValueError("comm, group: expected at most one of them, got both")
    device = _current_cuda_device() if device is None else int(device)
    if isinstance(comm, _core.Communicator):  # a syncbn.comm.mpi(...) communicator
        comm = getattr(comm, "mpi4py_comm", None)
        if comm is None:
            raise TypeError("comm: expected an mpi4py communicator or syncbn.comm.mpi(...), "
                            "got a syncbn communicator that is not an MPI one")
    if group is not None or (comm is None and _torch_distributed_ready()):
        import torch.distributed as dist

        rank, size = dist.get_rank(group), dist.get_world_size(group)
        box = [cuda.nccl_unique_id() if rank == 0 else None]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0,
                                   group=group)
        uid = box[0]
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD if comm is None else comm
        rank, size = comm.Get_rank(), comm.Get_size()
        uid = comm.bcast(cuda.nccl_unique_id() if rank == 0 else None, root=0)
    return _core.ForeignCommunicator(cuda.nccl_communicator(uid, rank, size, device))


def _int_or_none(v, name: str):
    if v is None:
        return None
    if isinstance(v, bool) or not hasattr(v, "__index__"):
        raise TypeError(f"{name}: expected an int or None, got {type(v).__name__}")
    return int(v)


def split(comm, color, key=None):
    """A subgroup of ``comm``: the ranks that pass the same ``color`` (an int >= 0) form one
    communicator of the same kind, ranked by ``key`` (default: their rank in ``comm``). A
    rank passing ``color=None`` joins none and gets ``None``. Collective: every rank of
    ``comm`` must call it. Works for :func:`mpi` (``MPI_Comm_split``), :func:`nccl`
    (``ncclCommSplit``, no new bootstrap) and :func:`local`; for a torch.distributed group
    make the subgroup with ``torch.distributed.new_group`` and pass that."""
    color = _int_or_none(color, "color")
    key = _int_or_none(key, "key")
    if color is not None and color < 0:
        raise ValueError(f"color: expected an int >= 0 or None, got {color}")
    if _is_mpi4py_comm(comm):
        comm = mpi(comm)
    if not isinstance(comm, _core.Communicator):
        raise TypeError(f"comm: expected a syncbn communicator (syncbn.comm.mpi, nccl or "
                        f"local) or an mpi4py communicator, got {type(comm).__name__}")
    key = comm.rank if key is None else key
    if isinstance(comm, _core.LocalCommunicator):
        return None if color is None else local()
    mpi4py_comm = getattr(comm, "mpi4py_comm", None)
    if mpi4py_comm is not None:
        from mpi4py import MPI

        sub = mpi4py_comm.Split(MPI.UNDEFINED if color is None else color, key)
        return None if sub == MPI.COMM_NULL else mpi(sub, timeout=comm.timeout)
    if comm.kind == "nccl":
        from . import _device

        cap = _device.cuda().nccl_split(comm.capsule, -1 if color is None else color, key)
        return None if cap is None else _core.ForeignCommunicator(cap)
    raise TypeError(f"comm: cannot split a {comm.kind!r} communicator; split the group it "
                    "was made from (torch.distributed.new_group, your own object) instead")


def _torch_distributed_ready() -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def _is_mpi4py_comm(obj) -> bool:
    mod = sys.modules.get("mpi4py.MPI")
    return mod is not None and isinstance(obj, mod.Comm)


def as_communicator(obj, like=None) -> Communicator:
    """Turns None, a syncbn communicator, an mpi4py communicator, a torch.distributed
    group or a user object with ``rank``, ``size`` and ``allreduce(buf)`` into a
    communicator the core can call. ``like``: an array whose device picks the default."""
    if obj is None:
        return default(like)
    if isinstance(obj, _core.Communicator):
        return obj
    if _is_mpi4py_comm(obj):
        return mpi(obj)
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and isinstance(obj, dist.ProcessGroup):
        return _process_group(obj, like)
    missing = [n for n in ("rank", "size", "allreduce") if not hasattr(obj, n)]
    if missing or not callable(obj.allreduce):
        raise TypeError(
            "comm: expected a syncbn communicator, an mpi4py communicator, or an object with "
            "integer attributes `rank` and `size` and a method `allreduce(buf)`; got "
            f"{type(obj).__name__} without {', '.join(missing) or 'a callable allreduce'}"
        )
    for name in ("rank", "size"):
        v = getattr(obj, name)
        if isinstance(v, bool) or not isinstance(v, int) and not hasattr(v, "__index__"):
            raise TypeError(f"comm: expected an integer `{name}`, got {type(v).__name__}")
    if not 0 <= int(obj.rank) < int(obj.size) <= 2**31 - 1:
        raise ValueError(f"comm: expected 0 <= rank < size <= 2**31 - 1, got "
                         f"rank={obj.rank}, size={obj.size}")
    return _core.PythonCommunicator(obj)


_default = None


def _launched_by_mpi() -> bool:
    for var in _LAUNCHER_SIZE_VARS:
        try:
            if int(os.environ.get(var, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


_by_group: dict = {}  # (id(group), device) -> (group, communicator)


def _process_group(group, like) -> Communicator:
    """A torch.distributed group (None: the default one) as a communicator for arrays
    like `like`, made once per group and device and shared by every layer: CUDA arrays on
    an NCCL group get an NCCL communicator bootstrapped from it (collectively, on first
    use), anything else the group itself."""
    import torch.distributed as dist

    from . import _arrays

    g = dist.group.WORLD if group is None else group
    cuda = like is not None and _arrays.is_cuda(like)
    dev = (like.device.index if hasattr(like.device, "index") else like.device.id) if cuda \
        else None
    hit = _by_group.get((id(g), dev))
    if hit is not None and hit[0] is g:
        return hit[1]
    if cuda and dist.get_backend(group) == "nccl":
        c = nccl(group=group, device=dev)
    else:
        c = torch_distributed(group)
    _by_group[(id(g), dev)] = (g, c)
    return c


def default(like=None) -> Communicator:
    """The communicator used when none is given: the torch.distributed default group if
    it is initialized (for CUDA arrays with an NCCL process group: an NCCL communicator
    bootstrapped from it, made once per device); else ``MPI.COMM_WORLD`` when the process
    runs under an MPI launcher (or mpi4py is already initialized) with more than one
    rank; else :func:`local`. The MPI/local answer is resolved once per process."""
    global _default
    if _torch_distributed_ready():
        return _process_group(None, like)
    if _default is None:
        world = None
        if "mpi4py.MPI" in sys.modules or _launched_by_mpi():
            from mpi4py import MPI

            if MPI.Is_initialized() and MPI.COMM_WORLD.Get_size() > 1:
                world = mpi(MPI.COMM_WORLD)
        _default = world if world is not None else local()
    return _default
