"""One rank of a fault-injection job (see tests/test_faults.py).

Usage: mpiexec -n N python -m mpi4py faults.py SCENARIO[,SCENARIO...]
       torchrun --nproc-per-node N faults.py SCENARIO[,SCENARIO...]   (gloo)

A small model with three SyncBN layers of the same C (made by convert_sync_batchnorm, so
they are named by their path) trains for a few steps; the last rank injects the
scenario's fault. Scenarios that the collective fingerprint can see (every rank raises
CollectiveMismatchError at the same collective) run one after the other in one job:
after the error every rank goes on in step. Each rank prints one line per outcome:

    OUTCOME rank=R scenario=S error=TYPE message=...   (then a barrier: all ranks saw it)
    OK rank=R scenario=S                               (the scenario raised nowhere)
    FAULT-AT rank=R time=T                              (the faulty rank, before a fault
                                                         the launcher must handle)

Scenarios the launcher must end (bad input or an exception on one rank, SIGKILL,
sys.exit(0)) are the last of a job: the faulty rank raises or dies, the others wait in a
collective until the launcher ends them (or, with a collective timeout, raise). In
`eval_step` the faulty rank runs one whole step in eval: every later collective still
agrees (it is one step behind in lockstep), nothing can see it, and it finishes one step
early while the others wait for it.
"""

import datetime
import os
import signal
import sys
import time

import torch

import syncbn
import syncbn.torch as sbt

TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ
if TORCHRUN:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", timeout=datetime.timedelta(seconds=float(os.environ.get("GLOO_TIMEOUT", 30))))
    RANK, SIZE = dist.get_rank(), dist.get_world_size()

    def barrier():
        dist.barrier()
else:
    from mpi4py import MPI

    RANK, SIZE = MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()

    def barrier():
        MPI.COMM_WORLD.Barrier()

FAULTY = SIZE - 1
C = 4


def say(line):
    """One write per line, so that the launcher does not interleave ranks' lines."""
    os.write(1, (line + "\n").encode())


def make_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv1d(C, C, 1), torch.nn.BatchNorm1d(C), torch.nn.ReLU(),
        torch.nn.Conv1d(C, C, 1), torch.nn.BatchNorm1d(C), torch.nn.ReLU(),
        torch.nn.Conv1d(C, C, 1), torch.nn.BatchNorm1d(C))
    return sbt.convert_sync_batchnorm(net)


def batch(step, channels=C):
    n = 1 + (RANK + step) % 3  # uneven ranks
    g = torch.Generator().manual_seed(1000 * step + RANK)
    return torch.randn(n, channels, 5, generator=g)


def train_step(net, x, order=None, skip=None, eval_layer=None):
    """Forward through the blocks (in `order`, skipping block `skip`, one BN in eval),
    then backward."""
    blocks = [net[0:3], net[3:6], net[6:8]]
    if eval_layer is not None:
        net[eval_layer].eval()
    try:
        h = x.requires_grad_(True)
        for i in order or range(3):
            if i != skip:
                h = blocks[i](h)
        h.square().mean().backward()
    finally:
        net.train()


def fingerprint_scenario(name, net):
    faulty = RANK == FAULTY
    if name == "agree":  # control: nothing wrong, must raise nowhere
        train_step(net, batch(0))
    elif name == "axis":  # the same C on another channel axis
        x = torch.randn(3, C, C, dtype=torch.float64)
        syncbn.batch_norm_forward(x, axis=-1 if faulty else 1, layer=0)
    elif name == "train_flag":  # one BN layer in eval on one rank only
        train_step(net, batch(1), eval_layer=4 if faulty else None)
    elif name == "layer_order":  # blocks run in another order on one rank
        train_step(net, batch(2), order=[0, 2, 1] if faulty else None)
    elif name == "skip_layer":  # one rank skips a block (same C)
        train_step(net, batch(3), skip=1 if faulty else None)
    else:
        raise ValueError(name)


def launcher_scenario(name, net):
    for step in range(4):
        if step == 2 and RANK == FAULTY:
            say(f"FAULT-AT rank={RANK} time={time.time():.3f}")
            if name == "bad_input":  # wrong channel count: ValueError before any collective
                net[1](batch(step, channels=C + 1))
            elif name == "exception":  # the user's own code fails mid-step
                net[0:3](batch(step))
                raise RuntimeError("user code failed mid-step")
            elif name == "sigkill":
                net[0:3](batch(step))
                os.kill(os.getpid(), signal.SIGKILL)
            elif name == "exit0":
                net[0:3](batch(step))
                sys.exit(0)
            elif name == "eval_step":  # a whole step in eval: invisible to the fingerprint
                net.eval()
                train_step(net, batch(step))
                continue
            else:
                raise ValueError(name)
        train_step(net, batch(step))


def main(scenarios):
    net = make_model()
    for name in scenarios:
        if name in ("bad_input", "exception", "sigkill", "exit0", "eval_step"):
            try:
                launcher_scenario(name, net)
            except Exception as e:
                msg = str(e).replace("\n", " ")
                say(f"OUTCOME rank={RANK} scenario={name} error={type(e).__name__} "
                      f"message={msg}")
                raise
            say(f"OK rank={RANK} scenario={name}")
            if name == "eval_step":  # one step behind the others: it has nothing left
                return
            continue
        try:
            fingerprint_scenario(name, net)
        except Exception as e:
            msg = str(e).replace("\n", " ")
            say(f"OUTCOME rank={RANK} scenario={name} error={type(e).__name__} "
                  f"message={msg}")
            if not isinstance(e, syncbn.CollectiveMismatchError):
                raise
            barrier()  # every rank got it: all go on in step
            continue
        say(f"OK rank={RANK} scenario={name}")
    barrier()
    say(f"DONE rank={RANK}")


if __name__ == "__main__":
    main(sys.argv[1].split(","))
