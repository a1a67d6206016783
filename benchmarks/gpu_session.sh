#!/usr/bin/env bash
# Everything that needs a GPU, in one call on a GPU machine that has no network (the
# device machine this project is sometimes lent): build syncbn with CUDA + NCCL, run
# tests/test_cuda.py (equivalence on the device, NCCL world of 1, 2-4 MPI ranks sharing
# the GPU with device buffers, CUDA-graph capture, CuPy), then benchmarks/bench_gpu.py.
# Logs, JUnit XML and benchmark JSON land in $OUT (default ./gpu_out).
#
# That machine's python3 (3.12) already has torch, cupy, nvidia-nccl-cu13, nanobind,
# scikit-build-core, cmake, ninja and pytest; MPI comes as wheels carried in .whl/:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_5_x86_64 -d .whl \
#     mpich==5.0.2 mpi4py==4.1.2
# and then, carrying .whl:  bash benchmarks/gpu_session.sh [--quick]
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

step "done: tests rc=$tests_rc, benchmark rc=$bench_rc"
exit $((tests_rc || bench_rc))
