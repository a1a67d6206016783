"""`python -m syncbn`, the examples, and the build facts users rely on."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import syncbn

from conftest import ROOT, run_mpi


def test_build_info_says_what_was_built():
    info = syncbn.build_info()
    for key in ("version", "cuda", "nccl", "mpi", "mpi_library_version", "threads", "openmp",
                "cuda_devices", "cuda_runtime", "cuda_architectures", "nccl_version", "jax",
                "xla_ffi_api"):
        assert key in info
    assert info["version"] == syncbn.__version__
    assert info["mpi"] is True and "MPICH" in info["mpi_library_version"]
    assert info["threads"] >= 1
    assert isinstance(info["cuda"], bool) and isinstance(info["nccl"], bool)
    assert info["cuda"] or (info["cuda_devices"] == 0 and not info["nccl"])
    assert isinstance(info["jax"], bool)
    assert (info["xla_ffi_api"] is None) != info["jax"]  # the FFI version built against


def test_threads_follow_SYNCBN_NUM_THREADS():
    code = "import syncbn; print(syncbn.build_info()['threads'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"SYNCBN_NUM_THREADS": "3", "PATH": "/usr/bin:/bin"}, check=True)
    assert out.stdout.strip() == "3"


@pytest.mark.parametrize("env,expect", [
    ({"OMP_NUM_THREADS": "1"}, 1),
    ({"SYNCBN_NUM_THREADS": "3", "OMP_NUM_THREADS": "1"}, 3),
    ({"MPI_LOCALNRANKS": "2"}, "half"),  # MPICH's Hydra
    ({"LOCAL_WORLD_SIZE": "64"}, 1),  # torchrun, more ranks than CPUs
    ({}, "all"),
])
def test_default_threads_share_the_host_with_the_other_local_ranks(env, expect):
    """Two ranks on two CPUs each spinning two threads took 40 ms a call instead of 0.2 ms
    (benchmarks/bench_fingerprint.py under mpiexec -n 2): by default a rank takes its share
    of the CPUs it may use."""
    import os

    cpus = len(os.sched_getaffinity(0))
    code = "import syncbn; print(syncbn.build_info()['threads'])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PATH": "/usr/bin:/bin", **env}, check=True)
    want = {"half": max(1, cpus // 2), "all": cpus}.get(expect, expect)
    if cpus < (os.cpu_count() or cpus) and expect == "half":
        want = cpus  # this process is bound to some CPUs: they are its own
    assert int(out.stdout) == want


def test_extension_has_no_rpath_into_the_build_environment():
    so = next(Path(syncbn._core.__file__).parent.glob("_core*"))
    dyn = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True,
                         check=True).stdout
    paths = [ln for ln in dyn.splitlines() if "RPATH" in ln or "RUNPATH" in ln]
    assert paths and all("pip-build-env" not in ln and "/tmp/" not in ln for ln in paths), paths
    assert any("$ORIGIN" in ln for ln in paths), paths


def test_python_m_syncbn_self_check_single_process():
    out = subprocess.run([sys.executable, "-m", "syncbn"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "self-check passed" in out.stdout and "mpi:" in out.stdout


@pytest.mark.parametrize("nranks", [2, 3])
def test_python_m_syncbn_self_check_under_mpiexec(nranks):
    out = run_mpi(nranks, "-m", "syncbn")
    assert out.stdout.count("self-check passed") == nranks, out.stdout
    assert f"/{nranks} (mpi)" in out.stdout


def test_numpy_example_under_mpiexec_4_ranks():
    out = run_mpi(4, ROOT / "examples" / "numpy_sync_bn.py", timeout=240)
    assert "OK" in out.stdout and "MISMATCH" not in out.stdout, out.stdout


def test_comm_split_gives_a_subgroup_of_the_same_kind_and_checks_its_arguments():
    from mpi4py import MPI

    split = syncbn.comm.split
    for parent in (syncbn.comm.mpi(), MPI.COMM_WORLD):
        sub = split(parent, 0)
        assert (sub.kind, sub.rank, sub.size) == ("mpi", 0, 1)
        assert split(parent, None) is None  # MPI_UNDEFINED: in no subgroup
    assert split(syncbn.comm.local(), 5, key=3).kind == "local"
    assert split(syncbn.comm.local(), None) is None
    w = syncbn.comm.mpi()
    with pytest.raises(ValueError, match=r"color: expected an int >= 0 or None, got -2"):
        split(w, -2)
    with pytest.raises(TypeError, match="color: expected an int or None, got float"):
        split(w, 1.5)
    with pytest.raises(TypeError, match="key: expected an int or None, got str"):
        split(w, 0, key="a")
    with pytest.raises(TypeError, match="comm: expected a syncbn communicator"):
        split(object(), 0)

    class Mine:
        rank, size = 0, 1

        def allreduce(self, buf):
            pass

    with pytest.raises(TypeError, match="cannot split a 'python' communicator"):
        split(syncbn.comm.as_communicator(Mine()), 0)


def test_mpi_mismatch_between_module_and_mpi4py_is_a_clear_error():
    class OtherMPI:  # what mpi4py would report had it loaded another MPI library
        @staticmethod
        def Get_library_version():
            return "Open MPI v5.0.5, package: Open MPI ..."

    with pytest.raises(RuntimeError, match="different MPI.*Open MPI"):
        syncbn.comm._check_same_mpi(OtherMPI)


def test_mpi_communicator_reports_rank_and_size_single_process():
    from mpi4py import MPI

    c = syncbn.comm.mpi()
    assert (c.rank, c.size, c.kind) == (0, 1, "mpi")
    sub = syncbn.comm.mpi(MPI.COMM_WORLD.Split(0, 0))
    assert sub.size == 1
    with pytest.raises(ValueError, match="comm: expected a valid MPI communicator"):
        syncbn.comm.mpi(MPI.COMM_NULL)
