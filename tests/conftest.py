"""Shared helpers: launching real `mpiexec` jobs from pytest."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKERS = Path(__file__).resolve().parent / "workers"


def mpiexec_path() -> str:
    """The launcher of the MPI that mpi4py uses: the mpich wheel's, next to python."""
    cand = Path(sys.executable).parent / "mpiexec"
    if cand.exists():
        return str(cand)
    from shutil import which

    found = which("mpiexec")
    if not found:
        pytest.fail("mpiexec not found next to the Python interpreter nor on PATH; "
                    "install the test extra (pip install -e '.[test]')")
    return found


def run_mpi(nranks: int, script, *args, timeout: int = 120, env=None, check=True):
    """Runs `mpiexec -n N python -m mpi4py script args...` and returns the completed
    process. `python -m mpi4py` turns an uncaught exception on any rank into MPI_Abort,
    so a failing rank ends the job instead of leaving the others blocked in a collective;
    MPIEXEC_TIMEOUT (Hydra) and the subprocess timeout bound a real hang."""
    e = dict(os.environ)
    e["MPIEXEC_TIMEOUT"] = str(timeout)
    e.setdefault("PYTHONUNBUFFERED", "1")
    if env:
        e.update(env)
    cmd = [mpiexec_path(), "-n", str(nranks), sys.executable, "-m", "mpi4py", str(script),
           *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 30, env=e,
                          cwd=ROOT)
    if check and proc.returncode != 0:
        pytest.fail(f"mpiexec -n {nranks} {script} exited {proc.returncode}\n"
                    f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def run_torchrun(nranks: int, script, *args, timeout: int = 300, env=None, check=True,
                 extra=()):
    """Runs `torchrun --standalone --nproc_per_node N script args...` (gloo workers on the
    CPU) and returns the completed process; the subprocess timeout bounds a real hang."""
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", f"--nproc_per_node={nranks}", *extra, str(script),
           *map(str, args)]
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if env:
        e.update(env)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=e,
                          cwd=WORKERS)
    if check and proc.returncode != 0:
        pytest.fail(f"torchrun -n {nranks} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
                    f"{proc.stderr[-5000:]}")
    return proc


@pytest.fixture
def mpi():
    return run_mpi
