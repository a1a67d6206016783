#!/bin/bash
# Builds the CUDA kernels for the host through shim/cuda_runtime.h (coroutine threads,
# real __syncthreads/shuffle semantics) and runs test_kernels.cpp against references.
# usage: build_emu.sh [GRID_CAP] [extra g++ flags]   (GRID_CAP small = many grid-stride steps)
set -e
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
export EMU_OUT=${EMU_OUT:-/tmp/syncbn_emu}
mkdir -p "$EMU_OUT"
python3 "$HERE/gen.py" >/dev/null
CAP=${1:-3}; shift || true
S=$EMU_OUT/src/cuda
g++ -std=c++17 -O2 -g -Wall -Wno-unknown-pragmas -Wno-sign-compare "$@" -DEMU_GRID_CAP=$CAP \
  -I "$HERE/shim" -I "$EMU_OUT/src" -I "$ROOT/core/include" -I "$ROOT/core/internal" \
  $S/batch_norm_stats.cpp $S/batch_norm_gather_stats.cpp $S/batch_norm_elemt.cpp \
  $S/batch_norm_backward_reduce.cpp $S/batch_norm_backward_elemt.cpp $S/copy_strided.cpp \
  $S/vectors.cpp $ROOT/core/src/tensor.cpp $ROOT/core/src/collective.cpp "$HERE/test_kernels.cpp" -o "$EMU_OUT/test_kernels"
"$EMU_OUT/test_kernels"
"$EMU_OUT/test_kernels" big
