"""`python -m syncbn`: print what this build has, then check SyncBN against a float64
batch norm on the global batch. Under mpiexec every rank takes part (uneven slices).

`python -m syncbn --cmake-dir` prints the directory of the C++ package (syncbnConfig.cmake)
this installation carries, for `-Dsyncbn_DIR=` or `CMAKE_PREFIX_PATH`; `--include-dir` the
directory of its headers."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

import syncbn


def package_dir() -> Path:
    """Where CMake installed the package's files: beside the compiled module, which in an
    editable install is not the source folder that `syncbn.__file__` points at."""
    return Path(importlib.util.find_spec("syncbn._core").origin).parent


def cmake_dir() -> Path:
    d = package_dir() / "cmake"
    if not (d / "syncbnConfig.cmake").is_file():
        raise FileNotFoundError(f"no syncbnConfig.cmake in {d}: this installation of syncbn "
                                "was built without its C++ package")
    return d


def _slice(rank: int, C: int) -> np.ndarray:
    n = 1 + rank % 3  # uneven slices
    return np.random.default_rng(1234 + rank).standard_normal((n, C, 5)) * 3 + 7


def self_check() -> tuple[bool, str]:
    comm = syncbn.comm.default()
    rank, size, C = comm.rank, comm.size, 4
    x = _slice(rank, C).astype(np.float32)
    dy = np.random.default_rng(99 + rank).standard_normal(x.shape).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, ctx = syncbn.batch_norm_forward(x, None, None, rm, rv, comm=comm)
    dx, _, _ = syncbn.batch_norm_backward(dy, ctx)

    # Every rank rebuilds the whole batch from the seeds: no extra communication needed.
    X = np.concatenate([_slice(r, C).astype(np.float32) for r in range(size)]).astype(float)
    DY = np.concatenate([np.random.default_rng(99 + r).standard_normal(_slice(r, C).shape)
                         .astype(np.float32) for r in range(size)]).astype(float)
    m, v = X.mean(axis=(0, 2)), X.var(axis=(0, 2))
    xhat = (X - m[:, None]) / np.sqrt(v[:, None] + 1e-5)
    dxr = (DY - DY.mean(axis=(0, 2))[:, None]
           - xhat * (DY * xhat).mean(axis=(0, 2))[:, None]) / np.sqrt(v[:, None] + 1e-5)
    off = sum(_slice(r, C).shape[0] for r in range(rank))
    sl = slice(off, off + x.shape[0])
    err = max(np.abs(y - xhat[sl]).max(), np.abs(dx - dxr[sl]).max(),
              np.abs(rm - 0.1 * m).max())
    ok = bool(err < 1e-4)
    return ok, f"rank {rank}/{size} ({comm.kind}): max error vs float64 reference {err:.2e}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m syncbn", description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cmake-dir", "--cmake_dir", action="store_true",
                       help="print the directory holding syncbnConfig.cmake and exit")
    where.add_argument("--include-dir", "--include_dir", action="store_true",
                       help="print the directory of the C++ headers and exit")
    args = parser.parse_args(argv)
    if args.cmake_dir or args.include_dir:
        try:
            d = cmake_dir() if args.cmake_dir else cmake_dir().parent / "include"
        except FileNotFoundError as e:
            print(f"python -m syncbn: {e}", file=sys.stderr)
            return 1
        print(d)
        return 0

    info = syncbn.build_info()
    comm = syncbn.comm.default()
    if comm.rank == 0:
        print(f"syncbn {info['version']}")
        for k, v in info.items():
            if k == "mpi_library_version" and v:
                v = v.strip().splitlines()[0]
            if k != "version":
                print(f"  {k}: {v}")
    ok, msg = self_check()
    print(f"  self-check {'passed' if ok else 'FAILED'}: {msg}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
