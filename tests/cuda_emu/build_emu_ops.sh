#!/bin/bash
# Builds the CUDA device backend's orchestration (core/src/cuda/ops.cu) and kernels for the
# host through shim/cuda_runtime.h, links them with the real core (the syncbn_core sources
# of CMakeLists.txt, MPI communicator included, without OpenMP) and test_ops.cpp, then runs
# it: once alone (LocalCommunicator and in-process fake communicators) and once under
# `mpiexec -n 3` (MpiCommunicator, uneven ranks, one of them empty).
#
# usage: build_emu_ops.sh [--build-only] [GRID_CAP] [extra g++ flags]
# env:   EMU_OUT     build directory (default /tmp/syncbn_emu_ops)
#        MPI_PREFIX  the prefix holding include/mpi.h, lib/libmpi.so and bin/mpiexec (the
#                    mpich wheel: the venv of the Python that runs the tests, which passes
#                    sys.prefix; default: the prefix of `python3` on PATH if it has mpi.h,
#                    else <repo>/.venv)
#        JOBS        parallel compiles (default: nproc)
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export EMU_OUT=${EMU_OUT:-/tmp/syncbn_emu_ops}
BUILD_ONLY=0
if [ "$1" = "--build-only" ]; then BUILD_ONLY=1; shift; fi
CAP=${1:-3}; shift || true
if [ -z "$MPI_PREFIX" ]; then
  MPI_PREFIX=$(python3 -c 'import sys; print(sys.prefix)')
  [ -f "$MPI_PREFIX/include/mpi.h" ] || MPI_PREFIX=$ROOT/.venv
fi
if [ ! -f "$MPI_PREFIX/include/mpi.h" ]; then
  echo "build_emu_ops.sh: no mpi.h under MPI_PREFIX=$MPI_PREFIX (install the mpich wheel)" >&2
  exit 2
fi
JOBS=${JOBS:-$(nproc)}

mkdir -p "$EMU_OUT/obj"
python3 "$HERE/gen.py" >/dev/null
S=$EMU_OUT/src/cuda
O=$EMU_OUT/obj
rm -f "$O"/*.o "$O"/*.failed
FLAGS=(-std=c++17 -O1 -Wall -Wno-unknown-pragmas -Wno-sign-compare -Wno-psabi -DEMU_GRID_CAP="$CAP" "$@")
CORE_INC=(-I "$ROOT/core/include" -I "$ROOT/core/internal" -I "$MPI_PREFIX/include" -DSYNCBN_WITH_MPI '-DSYNCBN_VERSION="emu"')
EMU_INC=(-I "$HERE/shim" -I "$EMU_OUT/src" -I "$ROOT/core/include" -I "$ROOT/core/internal"
         -I "$MPI_PREFIX/include")

# One translation unit: object, source, include flags; a failure leaves OBJECT.failed.
compile() {
  local o=$1 src=$2
  shift 2
  g++ "${FLAGS[@]}" "$@" -c "$src" -o "$O/$o" || touch "$O/$o.failed"
}
spawn() {  # at most JOBS compiles at a time
  while [ "$(jobs -rp | wc -l)" -ge "$JOBS" ]; do wait -n || true; done
  compile "$@" &
}
spawn test_ops.o "$HERE/test_ops.cpp" "${EMU_INC[@]}"
for f in ops batch_norm_stats batch_norm_gather_stats batch_norm_elemt \
         batch_norm_backward_reduce batch_norm_backward_elemt copy_strided vectors; do
  spawn "cuda_$f.o" "$S/$f.cpp" "${EMU_INC[@]}"
done
for f in build_config collective device_backend tensor ops cpu/threads cpu/batch_norm_stats \
         cpu/batch_norm_elemt cpu/batch_norm_backward_reduce cpu/batch_norm_backward_elemt cpu/masked \
         comm/mpi; do
  spawn "core_${f//\//_}.o" "$ROOT/core/src/$f.cpp" "${CORE_INC[@]}"
done
wait
if compgen -G "$O/*.failed" >/dev/null; then
  echo "build_emu_ops.sh: compilation failed" >&2
  exit 1
fi

g++ "$@" "$O"/*.o -L "$MPI_PREFIX/lib" -Wl,-rpath,"$MPI_PREFIX/lib" -lmpi -o "$EMU_OUT/test_ops"
[ "$BUILD_ONLY" = 1 ] && exit 0

"$EMU_OUT/test_ops" local
MPIEXEC_TIMEOUT=${MPIEXEC_TIMEOUT:-300} "$MPI_PREFIX/bin/mpiexec" -n 3 "$EMU_OUT/test_ops" mpi
