"""Which walk syncbn's CPU backward reduction takes over rows-mode inputs (channels_last):

    .venv/bin/python benchmarks/bench_reduce_walk.py [--pairs N] [--reps N] [--json PATH]

core/src/cpu/traverse.h reduces rows-mode inputs in tiles of 16 positions that run down
the rows (sums in registers), except large two-input reductions over rows of 64-128
positions, which run along the rows in address order (reduce_rows, sums in L1). This
builds benchmarks/reduce_walk.cpp (the float32 backward reduction kernel itself) three
times, with SYNCBN_REDUCE_WALK = 0 (that rule), 1 (tiles only) and 2 (along the rows at
any row length), and times them on rows-mode geometries, cold (64 MiB written before each
call, so x and dy come from memory as in a training step) and in cache (the previous
call's data left in place). The three run as separate processes in rotated order, P
pairs per case; figures are medians of the per-pair ratios against the tiles (< 1: faster
than the tiles). Needs a C++17 compiler with OpenMP ($CXX, default g++).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WALKS = {"rule": 0, "tiles": 1, "rows": 2}

# (label, outer, channels, inner): channels_last tensors are (N*H*W, C, 1).
CASES = [
    ("ResNet-18 cl (8,64,48,48)", 18432, 64, 1),
    ("ResNet-18 cl (8,64,24,24)", 4608, 64, 1),
    ("cl (32,128,28,28)", 25088, 128, 1),
    ("cl (8,128,24,24)", 4608, 128, 1),
    ("cl (32,256,14,14)", 6272, 256, 1),
    ("cl (32,512,7,7)", 1568, 512, 1),
    ("cl (16,2048,7,7)", 784, 2048, 1),
    ("cl (8,16,96,96)", 73728, 16, 1),
    ("cl (8,32,48,48)", 18432, 32, 1),
    ("NCHW (512,256,3,3)", 512, 256, 9),
]


def build(tmp: str) -> dict:
    cxx = os.environ.get("CXX", "g++")
    if shutil.which(cxx) is None:
        sys.exit(f"bench_reduce_walk: no C++ compiler {cxx!r} (set CXX)")
    out = {}
    for name, walk in WALKS.items():
        exe = os.path.join(tmp, f"reduce_walk_{name}")
        subprocess.run(
            [cxx, "-O3", "-std=c++17", "-fopenmp", "-Wno-psabi", "-DSYNCBN_WITH_OPENMP",
             f"-DSYNCBN_REDUCE_WALK={walk}", "-I", os.path.join(ROOT, "core", "include"),
             "-I", os.path.join(ROOT, "core", "internal"),
             os.path.join(ROOT, "benchmarks", "reduce_walk.cpp"),
             os.path.join(ROOT, "core", "src", "cpu", "batch_norm_backward_reduce.cpp"),
             os.path.join(ROOT, "core", "src", "cpu", "threads.cpp"), "-o", exe],
            check=True)
        out[name] = exe
    return out


def run(exe: str, outer: int, channels: int, inner: int, flush_mib: int, reps: int):
    p = subprocess.run([exe, str(outer), str(channels), str(inner), str(flush_mib), str(reps)],
                       check=True, capture_output=True, text=True, timeout=600)
    us, check = p.stdout.split()
    return float(us), float(check)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=5, help="rotations of the three builds")
    ap.add_argument("--reps", type=int, default=15, help="calls per process (median taken)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    args = ap.parse_args()
    names = list(WALKS)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        exes = build(tmp)
        print(f"reduce walk, float32 backward reduction, {os.cpu_count()} CPUs, "
              f"{args.pairs} pairs x {args.reps} calls; ratio to the tiles, median of pairs")
        print(f"  {'case':28s} {'L':>5s} {'MiB':>6s} {'memory':>8s}  {'rule':>6s} {'rows':>6s}"
              f"   tiles us")
        for label, outer, channels, inner in CASES:
            mib = 2 * 4 * outer * channels * inner / 2**20
            for memory, flush in (("cold", 64), ("cache", 0)):
                t = {n: [] for n in names}
                checks = []
                for p in range(args.pairs):
                    for k in range(len(names)):
                        n = names[(p + k) % len(names)]
                        us, check = run(exes[n], outer, channels, inner, flush, args.reps)
                        t[n].append(us)
                        checks.append(check)
                if max(checks) - min(checks) > 1e-9 * max(1.0, abs(checks[0])):
                    sys.exit(f"bench_reduce_walk: the walks disagree on {label}: {checks}")
                ratio = {n: statistics.median(a / b for a, b in zip(t[n], t["tiles"], strict=True))
                         for n in ("rule", "rows")}
                res = {"case": label, "outer": outer, "channels": channels, "inner": inner,
                       "row": channels * inner, "mib": mib, "memory": memory,
                       "us": {n: statistics.median(t[n]) for n in names},
                       "ratio_to_tiles": ratio}
                results.append(res)
                print(f"  {label:28s} {channels * inner:5d} {mib:6.1f} {memory:>8s}  "
                      f"{ratio['rule']:6.2f} {ratio['rows']:6.2f}   "
                      f"{res['us']['tiles']:8.1f}", flush=True)
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv,
                "cxx": os.environ.get("CXX", "g++")}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
