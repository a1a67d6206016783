#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a GPU machine that has no network (the
# device machine this project is sometimes lent): build syncbn with CUDA + NCCL, run
# tests/test_cuda.py (equivalence on the device, NCCL world of 1 and torch NCCL groups,
# 2-4 MPI ranks sharing the GPU with device buffers, CUDA-graph capture, CuPy), then
# benchmarks/bench_gpu.py, then the rest of the suite (with a GPU present, Keras' torch
# backend runs the Keras tests on it). Logs, JUnit XML and benchmark JSON land in $OUT
# (default ./gpu_out).
#
# That machine's python3 (3.12) already has torch, cupy, nvidia-nccl-cu13, nanobind,
# scikit-build-core, cmake, ninja and pytest; MPI and Keras come as wheels carried in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux_2_5_x86_64 -d .whl \
#     mpich==5.0.2 mpi4py==4.1.2 keras==3.15.1 optree==0.20.0 namex==0.1.0
# and then, carrying .whl:  bash benchmarks/gpu_session.sh [--quick]   (SKIP_REST=1: GPU
# tests and benchmark only; the device tool allows 10 minutes a command)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
exec > >(tee "$OUT/session.log") 2>&1
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
step() { echo; echo "=== $* ($(date +%T))"; }

step machine
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
"$PY" --version; nvcc --version | tail -1

step "MPI wheels"
if compgen -G ".whl/*.whl" >/dev/null; then
  # Into this Python's own prefix: mpiexec lands next to python, libmpi in <prefix>/lib,
  # which is where the tests and FindMPI look.
  "$PY" -m pip install -q --no-index --no-deps --upgrade .whl/*.whl || exit 1
else
  echo "no .whl/ carried: the MPI tests need the mpich and mpi4py wheels (see the header)"
fi

step build
# FindMPI looks for the mpich wheel's mpicc, next to this Python.
export PATH="$("$PY" -c 'import os, sys; print(os.path.join(sys.prefix, "bin"))'):$PATH"
NCCL_DIR=$("$PY" -c "import nvidia.nccl as m; print(list(m.__path__)[0])" 2>/dev/null)
echo "NCCL from: ${NCCL_DIR:-none}"
export LD_LIBRARY_PATH=${NCCL_DIR:+$NCCL_DIR/lib:}${LD_LIBRARY_PATH:-}
"$PY" -m pip install --no-build-isolation --no-deps -e . -C build-dir=/tmp/syncbn-build \
  -C cmake.define.SYNCBN_WITH_CUDA=ON -C cmake.define.CMAKE_CUDA_ARCHITECTURES=90 \
  ${NCCL_DIR:+-C cmake.define.NCCL_ROOT=$NCCL_DIR} 2>&1 | tail -20 || exit 1
"$PY" -c "import syncbn, json; print(json.dumps(syncbn.build_info(), indent=1))" || exit 1

step "GPU tests"
"$PY" -m pytest tests/test_cuda.py -v -rs --junitxml="$OUT/junit_cuda.xml" -p no:cacheprovider
tests_rc=$?

step "GPU benchmark"
"$PY" benchmarks/bench_gpu.py --json "$OUT/bench_gpu.json" "$@"
bench_rc=$?

rest_rc=0
if [ "${SKIP_REST:-0}" != 1 ]; then  # SKIP_REST=1: keep the call short (10-minute limit)
  step "the rest of the suite"
  "$PY" -m pytest tests --ignore=tests/test_cuda.py -q -rs --junitxml="$OUT/junit_rest.xml" \
    -p no:cacheprovider
  rest_rc=$?
fi

step "done: GPU tests rc=$tests_rc, benchmark rc=$bench_rc, rest rc=$rest_rc"
exit $((tests_rc || bench_rc || rest_rc))
