"""What the collective fingerprint and the validation of reduced buffers cost.

    .venv/bin/python benchmarks/bench_fingerprint.py [--reps N] [--old PATH] [--json PATH]

Three measurements of the functional fwd+bwd (float32, weight and bias, running stats),
each a ratio of medians of interleaved samples, on small layers (where a fixed per-call cost
shows) and a large one:
  * in process, local communicator: the verdict on vs off (syncbn.set_fingerprint); the
    fingerprint is written, sent and the buffer validated either way;
  * the same under `mpiexec -n 2` with the MPI communicator (each rank times its own calls);
  * with --old PATH (the `python/` folder of a build from before the fingerprint, its _core
    module copied into syncbn/): this build against that one, in alternating processes
    (python -S with PYTHONPATH, so each imports its own syncbn), K rounds; the ratio
    new/old of each round's medians, then the median over rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import sysconfig
import time

SHAPES = [(8, 512, 3, 3), (8, 256, 6, 6), (8, 64, 24, 24), (32, 64, 56, 56)]


def calibrate(fn, min_s=0.02):
    """Calls per sample so that one sample lasts at least min_s."""
    n = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        if time.perf_counter() - t0 >= min_s:
            return n
        n *= 2


def sample(fn, n):
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n


def cases(syncbn, np, comm):
    out = {}
    for shape in SHAPES:
        C = shape[1]
        rng = np.random.default_rng(0)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
        rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

        def step(x=x, dy=dy, w=w, b=b, rm=rm, rv=rv):
            y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, comm=comm)
            syncbn.batch_norm_backward(dy, ctx)

        out[str(shape)] = step
    return out


def inproc(reps, comm_kind):
    import numpy as np

    import syncbn

    comm = syncbn.comm.mpi() if comm_kind == "mpi" else syncbn.comm.local()
    local = cases(syncbn, np, syncbn.comm.local())
    res = {}
    for name, fn in cases(syncbn, np, comm).items():
        # Calibrated without collectives: every rank must then make the same number.
        n = calibrate(local[name])
        if comm_kind == "mpi":
            from mpi4py import MPI

            n = MPI.COMM_WORLD.bcast(n, root=0)
        t = {"on": [], "off": []}
        for r in range(reps + 2):
            for k in (("on", "off") if r % 2 else ("off", "on")):
                syncbn.set_fingerprint(k == "on")
                s = sample(fn, n)
                if r >= 2:
                    t[k].append(s)
        syncbn.set_fingerprint(True)
        res[name] = {"on_us": statistics.median(t["on"]) * 1e6,
                     "off_us": statistics.median(t["off"]) * 1e6,
                     "on/off": statistics.median(t["on"]) / statistics.median(t["off"])}
    return res


def one_build(reps):
    """Child of --old: median seconds per shape with whatever syncbn this process imports."""
    import numpy as np

    import syncbn

    fns = cases(syncbn, np, syncbn.comm.local())
    meds = {}
    for name, fn in fns.items():
        n = calibrate(fn)
        sample(fn, n)
        meds[name] = statistics.median(sample(fn, n) for _ in range(reps))
    print(json.dumps(meds))


def ab(old, reps, rounds):
    import shutil
    import tempfile

    import syncbn._core as core

    site = sysconfig.get_paths()["purelib"]
    # This build as a plain folder (an editable install's import hook is not used under -S).
    new = tempfile.mkdtemp(prefix="syncbn_new_")
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python", "syncbn")
    shutil.copytree(src, os.path.join(new, "syncbn"))
    shutil.copy(core.__file__, os.path.join(new, "syncbn"))
    runs = {"new": [], "old": []}
    for r in range(rounds):
        for k in (("new", "old") if r % 2 == 0 else ("old", "new")):
            # libmpi of the mpich wheel: the copied module's rpath points elsewhere.
            env = dict(os.environ, PYTHONPATH=f"{old if k == 'old' else new}:{site}",
                       LD_LIBRARY_PATH=os.path.join(sys.prefix, "lib"))
            out = subprocess.run([sys.executable, "-S", __file__, "--child", "--reps",
                                  str(reps)], capture_output=True, text=True, env=env,
                                 check=True).stdout
            runs[k].append(json.loads(out.strip().splitlines()[-1]))
    res = {}
    for name in runs["new"][0]:
        ratios = [n[name] / o[name] for n, o in zip(runs["new"], runs["old"], strict=True)]
        res[name] = {"new_us": statistics.median(n[name] for n in runs["new"]) * 1e6,
                     "old_us": statistics.median(o[name] for o in runs["old"]) * 1e6,
                     "new/old": statistics.median(ratios), "rounds": ratios}
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--old", metavar="PATH")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mpi-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return one_build(args.reps)
    if args.mpi_part:
        from mpi4py import MPI

        res = inproc(args.reps, "mpi")
        all_res = MPI.COMM_WORLD.gather(res, root=0)
        if MPI.COMM_WORLD.Get_rank() == 0:
            print(json.dumps(all_res))
        return 0
    out = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "host": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv,
                    "reps": args.reps}}
    out["local on/off"] = inproc(args.reps, "local")
    mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    p = subprocess.run([mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", __file__,
                        "--mpi-part", "--reps", str(args.reps)], capture_output=True,
                       text=True, timeout=1800, check=True)
    out["mpi-2 on/off"] = json.loads(p.stdout.strip().splitlines()[-1])
    if args.old:
        out["new/old"] = ab(args.old, args.reps, args.rounds)
    print(f"{'shape':18s} {'local on/off':>12s} {'mpi r0':>7s} {'mpi r1':>7s} {'new/old':>8s}")
    for name in out["local on/off"]:
        row = [out["local on/off"][name]["on/off"]] + [r[name]["on/off"]
                                                       for r in out["mpi-2 on/off"]]
        na = out.get("new/old", {}).get(name, {}).get("new/old")
        print(f"{name:18s} {row[0]:12.3f} {row[1]:7.3f} {row[2]:7.3f} "
              f"{'' if na is None else f'{na:8.3f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
