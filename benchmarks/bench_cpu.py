"""CPU benchmark: syncbn against torch.nn.functional.batch_norm, in one run.

    .venv/bin/python benchmarks/bench_cpu.py [--quick] [--reps N] [--json PATH] [--no-mpi]
                                             [--malloc-keep]

What it measures (float32, training mode, weight and bias given):
  * fwd and fwd+bwd of syncbn (NumPy inputs, comm=local) and of torch (CPU, same thread
    count) on NCHW (32,64,56,56), NHWC (the same shape channels-last) and 2-D (256,1024);
    syncbn on the torch tensors (DLPack) as a secondary row. Contenders are interleaved
    (balanced orders: each runs right after each other equally often) because the machine
    is shared and noisy; the figures are medians and minima over repetitions, and ratios
    syncbn/torch (< 1: syncbn faster).
  * the machine's copy bandwidth (NumPy single-threaded and torch multi-threaded copy of
    a 256 MiB float32 array; the better one is the reference) and syncbn's fraction of it,
    counting 12 B/elem for fwd and 32 B/elem for fwd+bwd.
  * 2-rank MPI overhead: the script relaunches itself under mpiexec with --mpi-part; each
    rank times fwd+bwd on half the batch with comm=mpi() against comm=local().
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

# Targets from the project brief; ratios are syncbn time / torch time.
TARGET_NCHW_FWDBWD = 0.5
TARGET_NHWC_FWDBWD = 1.0
TARGET_BW_FRACTION = 0.70
TARGET_MPI_OVERHEAD = 0.15

BYTES_PER_ELEM = {"fwd": 12, "fwd+bwd": 32}  # float32: fwd reads x twice, writes y once
MIN_SAMPLE_S = 0.005  # small shapes repeat the call inside one sample to beat timer noise
NOISY = 0.10  # other processes' share of the CPUs above which a section is flagged


# ---- timing ---------------------------------------------------------------------------


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def balanced_orders(names: list) -> list:
    """Orders to run contenders in, one per repetition, cycled. Up to 4 contenders, all
    orders: each runs right after each other equally often, and as often first and last.
    Above, rotations of the order and of its reverse: each runs before and after its
    neighbours equally often. (Rotating one order, A,B,C / B,C,A / C,A,B, keeps A always
    right before B, so whatever a contender leaves in the caches and the allocator always
    lands on the same next one.)"""
    if len(names) <= 4:
        return [list(p) for p in itertools.permutations(names)]
    n = len(names)
    fwd = [names[k:] + names[:k] for k in range(n)]
    return fwd + [list(reversed(o)) for o in fwd]


def interleaved(fns: dict, reps: int, warmup: int = 2, faults: dict | None = None) -> dict:
    """Times every callable in ``fns`` ``reps`` times, interleaved in balanced orders.

    Returns {name: list of seconds per call}. Each sample repeats the call ``inner`` times
    (calibrated in warm-up so a sample lasts >= MIN_SAMPLE_S) and divides. ``faults``, if
    given, receives {name: list of minor page faults per call} (fresh memory from the OS:
    the allocator's share of the time)."""
    inner = {}
    for name, fn in fns.items():
        for _ in range(warmup):
            fn()
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        inner[name] = max(1, int(MIN_SAMPLE_S / max(dt, 1e-9)))
    names = list(fns)
    orders = balanced_orders(names)
    out = {n: [] for n in names}
    pf = {n: [] for n in names}
    for r in range(reps):
        for name in orders[r % len(orders)]:
            fn, n = fns[name], inner[name]
            f0, t0 = minor_faults(), time.perf_counter()
            for _ in range(n):
                fn()
            out[name].append((time.perf_counter() - t0) / n)
            pf[name].append((minor_faults() - f0) / n)
    if faults is not None:
        faults.update(pf)
    return out


def summary(samples: list) -> dict:
    return {"median_s": statistics.median(samples), "min_s": min(samples), "n": len(samples),
            "samples_s": samples}


class Contention:
    """CPU time that other processes (and the hypervisor, as steal) took while a section
    ran, as a fraction of the machine's capacity: the figures of a section with a large
    one are unreliable, whatever the interleaving."""

    @staticmethod
    def _snap():
        with open("/proc/stat") as f:
            v = [int(t) for t in f.readline().split()[1:9]]
        tick = os.sysconf("SC_CLK_TCK")
        own = sum(getattr(resource.getrusage(who), a)
                  for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
                  for a in ("ru_utime", "ru_stime"))
        busy = (sum(v) - v[3] - v[4] - v[7]) / tick  # all but idle, iowait, steal
        return time.monotonic(), busy, v[7] / tick, own

    def __enter__(self):
        self.t0 = self._snap()
        return self

    def __exit__(self, *exc):
        (w0, b0, s0, o0), (w1, b1, s1, o1) = self.t0, self._snap()
        cap = (w1 - w0) * (os.cpu_count() or 1)
        self.others = max(0.0, (b1 - b0) - (o1 - o0)) / cap
        self.steal = (s1 - s0) / cap

    def as_dict(self):
        return {"others_cpu_fraction": self.others, "steal_fraction": self.steal}

    @property
    def noisy(self):
        return self.others + self.steal > NOISY

    def __str__(self):
        return (f"other processes used {self.others:.0%} of the CPUs, steal {self.steal:.0%}"
                + (" -- NOISY, figures unreliable" if self.noisy else ""))


# ---- copy bandwidth -------------------------------------------------------------------


def measure(fns: dict, reps: int) -> tuple[dict, dict]:
    """Interleaved samples per contender and their summaries, with the median page faults
    per call."""
    pf = {}
    t = interleaved(fns, reps, faults=pf)
    r = {k: summary(v) for k, v in t.items()}
    for k in r:
        r[k]["page_faults_per_call_median"] = statistics.median(pf[k])
    return t, r


def copy_bandwidth(nbytes: int, reps: int) -> dict:
    """Copy bandwidth (bytes moved = 2 x nbytes: read src, write dst), median over reps."""
    import torch

    n = nbytes // 4
    src = np.full(n, 1.0, np.float32)
    dst = np.zeros(n, np.float32)  # touched so page faults stay out of the timing
    ts, td = torch.from_numpy(src), torch.from_numpy(dst)
    t = interleaved({"numpy np.copyto (1 thread)": lambda: np.copyto(dst, src),
                     f"torch copy_ ({torch.get_num_threads()} threads)": lambda: td.copy_(ts)},
                    reps)
    res = {}
    for name, s in t.items():
        res[name] = {"GBps_median": 2 * src.nbytes / statistics.median(s) / 1e9,
                     "GBps_best": 2 * src.nbytes / min(s) / 1e9}
    return {"array_MiB": src.nbytes / 2**20, "methods": res}


# ---- single-process cases --------------------------------------------------------------


def make_case(name, shape_np, axis, to_torch, seed=0):
    """NumPy x/dy (syncbn's core path) and torch views of the same memory."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape_np, dtype=np.float32) * 2 + 0.5
    dy = rng.standard_normal(shape_np, dtype=np.float32)
    C = shape_np[axis]
    w = rng.uniform(0.5, 1.5, C).astype(np.float32)
    b = rng.uniform(-0.5, 0.5, C).astype(np.float32)
    return {"name": name, "x": x, "dy": dy, "w": w, "b": b, "axis": axis,
            "xt": to_torch(x), "dyt": to_torch(dy)}


def run_case(case, reps, syncbn, torch) -> dict:
    F = torch.nn.functional
    c = syncbn.comm.local()
    x, dy, w, b, axis = case["x"], case["dy"], case["w"], case["b"], case["axis"]
    xt, dyt = case["xt"], case["dyt"]
    wt, bt = torch.from_numpy(w), torch.from_numpy(b)
    # Leaves for torch autograd; autograd.grad returns (dx, dw, db) without accumulating
    # into .grad, so both sides compute exactly dx, dweight, dbias.
    xg, wg, bg = (t.detach().requires_grad_() for t in (xt, wt, bt))

    def s_fwd():
        return syncbn.batch_norm_forward(x, w, b, axis=axis, comm=c)

    def s_fwdbwd():
        y, ctx = syncbn.batch_norm_forward(x, w, b, axis=axis, comm=c)
        return syncbn.batch_norm_backward(dy, ctx)

    def st_fwd():
        return syncbn.batch_norm_forward(xt, wt, bt, comm=c)

    def st_fwdbwd():
        y, ctx = syncbn.batch_norm_forward(xt, wt, bt, comm=c)
        return syncbn.batch_norm_backward(dyt, ctx)

    def t_fwd():
        return F.batch_norm(xt, None, None, wt, bt, training=True)

    def t_fwdbwd():
        y = F.batch_norm(xg, None, None, wg, bg, training=True)
        return torch.autograd.grad(y, (xg, wg, bg), dyt)

    # Sanity: the contenders compute the same thing.
    ys, ctx = s_fwd()
    dxs, dws, dbs = syncbn.batch_norm_backward(dy, ctx)
    yt = F.batch_norm(xg, None, None, wg, bg, training=True)
    dxt, dwt, dbt = torch.autograd.grad(yt, (xg, wg, bg), dyt)
    to_np = lambda t: t.detach().numpy()  # noqa: E731
    if axis != 1:  # NHWC NumPy vs channels_last torch: same memory, compare the permuted view
        to_np = lambda t: t.detach().permute(0, 2, 3, 1).numpy()  # noqa: E731
    agree = {"max_abs_dy": float(np.abs(ys - to_np(yt)).max()),
             "max_abs_dx": float(np.abs(dxs - to_np(dxt)).max()),
             "max_abs_dweight": float(np.abs(dws - dwt.numpy()).max()),
             "max_abs_dbias": float(np.abs(dbs - dbt.numpy()).max())}
    del ys, ctx, dxs, yt, dxt

    res = {"shape": list(x.shape), "axis": axis, "numel": int(x.size), "agree": agree}
    for op, fns in (("fwd", {"syncbn": s_fwd, "torch": t_fwd, "syncbn_torch": st_fwd}),
                    ("fwd+bwd", {"syncbn": s_fwdbwd, "torch": t_fwdbwd,
                                 "syncbn_torch": st_fwdbwd})):
        t, r = measure(fns, reps)
        for k in ("syncbn", "syncbn_torch"):
            r[k]["ratio_median"] = r[k]["median_s"] / r["torch"]["median_s"]
            r[k]["ratio_min"] = r[k]["min_s"] / r["torch"]["min_s"]
            # Samples of one repetition ran next to each other: their ratio is robust to
            # load that comes and goes during the run.
            r[k]["ratio_paired_median"] = statistics.median(
                a / b for a, b in zip(t[k], t["torch"], strict=True))
        for k in r:
            r[k]["GBps_median"] = BYTES_PER_ELEM[op] * x.size / r[k]["median_s"] / 1e9
        res[op] = r
    return res


def breakdown(case, reps, syncbn) -> dict:
    """Where syncbn's time goes: each primitive of the chain alone (NumPy, local), with
    the bytes it must move, interleaved with a copy of the same array for scale."""
    x, dy, w, b, axis = case["x"], case["dy"], case["w"], case["b"], case["axis"]
    mean, invstd, _, count = syncbn.batch_norm_gather_stats(syncbn.batch_norm_stats(x, axis))
    sums, _, _ = syncbn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    dst = np.empty_like(x)
    fns = {  # name: (callable, bytes per element it must move)
        "copy (np.copyto)": (lambda: np.copyto(dst, x), 8),
        "stats (read x)": (lambda: syncbn.batch_norm_stats(x, axis), 4),
        "elemt (read x, write y)": (
            lambda: syncbn.batch_norm_elemt(x, mean, invstd, w, b, axis=axis), 8),
        "backward_reduce (read dy, x)": (
            lambda: syncbn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis), 8),
        "backward_elemt (read dy, x, write dx)": (
            lambda: syncbn.batch_norm_backward_elemt(dy, x, mean, invstd, w, sums, count,
                                                     axis=axis), 12),
    }
    t = interleaved({k: f for k, (f, _) in fns.items()}, reps)
    return {k: {"median_s": statistics.median(t[k]),
                "GBps_median": fns[k][1] * x.size / statistics.median(t[k]) / 1e9}
            for k in fns}


# ---- MPI part (runs under mpiexec) ---------------------------------------------------------


def mpi_part(reps: int) -> None:
    from mpi4py import MPI

    import syncbn

    world = MPI.COMM_WORLD
    rank, size = world.Get_rank(), world.Get_size()
    rng = np.random.default_rng(100 + rank)
    shape = (16, 64, 56, 56)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = np.ones(64, np.float32), np.zeros(64, np.float32)
    comms = {"mpi": syncbn.comm.mpi(world), "local": syncbn.comm.local()}

    def step(c):
        y, ctx = syncbn.batch_norm_forward(x, w, b, comm=c)
        syncbn.batch_norm_backward(dy, ctx)

    for _ in range(2):
        for c in comms.values():
            step(c)
    # Lockstep: a barrier before every sample keeps both ranks running the same contender
    # at the same time (local competes for memory bandwidth exactly as mpi does).
    times = {k: [] for k in comms}
    names = list(comms)
    for r in range(reps):
        for k in (names if r % 2 == 0 else names[::-1]):
            world.Barrier()
            t0 = time.perf_counter()
            step(comms[k])
            times[k].append(time.perf_counter() - t0)
    # The bare collective: one all-reduce of the 2C+1 float64 forward buffer.
    buf = np.zeros(2 * 64 + 1)
    world.Barrier()
    lat = []
    for _ in range(200):
        t0 = time.perf_counter()
        syncbn.allreduce(buf, comms["mpi"])
        lat.append(time.perf_counter() - t0)

    all_times = world.gather(times, root=0)
    all_lat = world.gather(statistics.median(lat), root=0)
    if rank == 0:
        # A data-parallel step lasts as long as its slowest rank: per-sample max over ranks.
        slow = {k: [max(t[k][i] for t in all_times) for i in range(reps)] for k in comms}
        res = {"ranks": size, "shape_per_rank": list(shape), "reps": reps,
               "threads_per_rank": syncbn.build_info()["threads"],
               "rank0": {k: summary(v) for k, v in times.items()},
               "slowest_rank": {k: summary(v) for k, v in slow.items()},
               "allreduce_2C+1_median_s_per_rank": all_lat}
        for key in ("rank0", "slowest_rank"):
            res[key]["overhead"] = (res[key]["mpi"]["median_s"] / res[key]["local"]["median_s"]
                                    - 1)
        print("MPI_RESULT " + json.dumps(res), flush=True)


def run_mpi(reps: int) -> dict:
    here = os.path.dirname(os.path.abspath(sys.executable))
    mpiexec = os.path.join(here, "mpiexec")
    env = dict(os.environ, SYNCBN_NUM_THREADS="1", OMP_NUM_THREADS="1", MPIEXEC_TIMEOUT="300")
    cmd = [mpiexec, "-n", "2", sys.executable, "-m", "mpi4py", os.path.abspath(__file__),
           "--mpi-part", "--reps", str(reps)]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
    for line in p.stdout.splitlines():
        if line.startswith("MPI_RESULT "):
            res = json.loads(line[len("MPI_RESULT "):])
            res["command"] = " ".join(cmd)
            res["env"] = "SYNCBN_NUM_THREADS=1 OMP_NUM_THREADS=1"
            return res
    return {"error": f"mpiexec exited {p.returncode}", "stdout": p.stdout[-2000:],
            "stderr": p.stderr[-2000:], "command": " ".join(cmd)}


# ---- report ---------------------------------------------------------------------------------


def mark(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def reexec_with_malloc_keep():
    """Re-executes this script with glibc settings that keep freed memory (no-op when
    already set). glibc reads them at start-up only; 32 MiB is the largest mmap threshold
    it accepts, every benchmark buffer is below it, so all come from the heap, which is
    never trimmed back to the OS."""
    if os.environ.get("MALLOC_TRIM_THRESHOLD_") is None:
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 * 2**20),
                   MALLOC_TRIM_THRESHOLD_=str(2**40))
        os.execve(sys.executable, [sys.executable, *sys.argv], env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (3 reps, 64 MiB copy)")
    ap.add_argument("--reps", type=int, default=None, help="repetitions after warm-up "
                    "(default 25, --quick 3)")
    ap.add_argument("--json", metavar="PATH", help="write every figure to PATH as JSON")
    ap.add_argument("--no-mpi", action="store_true", help="skip the 2-rank MPI part")
    ap.add_argument("--malloc-keep", action="store_true",
                    help="rerun under glibc settings that keep freed memory (no page faults "
                    "from fresh 25 MB buffers), to compare the kernels without the allocator")
    ap.add_argument("--mpi-part", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 25)
    if args.malloc_keep:
        reexec_with_malloc_keep()

    if args.mpi_part:
        mpi_part(reps)
        return 0

    import torch  # first, so its libgomp is the one process-wide OpenMP runtime

    import syncbn

    t_start = time.perf_counter()
    info = syncbn.build_info()
    if torch.get_num_threads() != info["threads"]:
        torch.set_num_threads(info["threads"])
    meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "syncbn_version": info["version"],
            "syncbn_threads": info["threads"], "syncbn_openmp": info["openmp"],
            "compiler": info["compiler"], "reps": reps, "dtype": "float32",
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
            "argv": sys.argv}
    print(f"syncbn {info['version']} ({info['compiler']}, openmp={info['openmp']}, "
          f"threads={info['threads']}) vs torch {torch.__version__} "
          f"(threads={torch.get_num_threads()}); numpy {np.__version__}; {os.cpu_count()} CPUs; "
          f"{reps} reps after 2 warm-up calls, contenders interleaved"
          + (f"; {meta['malloc_env']}" if meta["malloc_env"] else ""))

    # Bandwidth first, on the reference size and on the benchmark tensor's size.
    # Bandwidth first: the reference on 256 MiB, and for context on the size of one
    # benchmark tensor (32*64*56*56 float32 = 6.4 M elements, 24.5 MiB).
    with Contention() as load:
        bw_ref = copy_bandwidth((64 if args.quick else 256) * 2**20, reps)
        bw_case = copy_bandwidth(32 * 64 * 56 * 56 * 4, reps)
    best_name = max(bw_ref["methods"], key=lambda k: bw_ref["methods"][k]["GBps_median"])
    ref_gbps = bw_ref["methods"][best_name]["GBps_median"]
    bw_ref.update(reference=best_name, reference_GBps=ref_gbps, at_tensor_size=bw_case,
                  contention=load.as_dict())
    print(f"\ncopy bandwidth, float32, bytes moved = 2 x size ({load}):")
    for bw in (bw_ref, bw_case):
        for k, v in bw["methods"].items():
            print(f"  {bw['array_MiB']:5.1f} MiB  {k:30s} median {v['GBps_median']:6.1f} GB/s   "
                  f"best {v['GBps_best']:6.1f} GB/s")
    print(f"  reference: {best_name} on {bw_ref['array_MiB']:.0f} MiB ({ref_gbps:.1f} GB/s)")

    to_cl = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2)  # noqa: E731 NHWC memory, NCHW shape
    cases = [make_case("NCHW (32,64,56,56)", (32, 64, 56, 56), 1, torch.from_numpy),
             make_case("NHWC (32,56,56,64)", (32, 56, 56, 64), -1, to_cl),
             make_case("2-D (256,1024)", (256, 1024), 1, torch.from_numpy)]
    assert cases[1]["xt"].is_contiguous(memory_format=torch.channels_last)

    results = {}
    noisy = ["bandwidth"] if load.noisy else []
    for case in cases:
        with Contention() as load:
            results[case["name"]] = run_case(case, reps, syncbn, torch)
        results[case["name"]]["contention"] = load.as_dict()
        if load.noisy:
            noisy.append(case["name"].split()[0])
        if case["x"].ndim == 4:
            results[case["name"]]["breakdown"] = breakdown(case, reps, syncbn)
    del cases

    case_gbps = max(v["GBps_median"] for v in bw_case["methods"].values())
    print("\nper-call time in ms, median (min) over reps; ratio = syncbn / torch (< 1: syncbn "
          "faster) of the medians, of the minima, and the median of per-repetition ratios")
    print(f"  {'shape':19s} {'op':7s} {'torch':>16s} {'syncbn':>16s} {'ratio':>6s} {'min':>6s} "
          f"{'paired':>6s} {'bw frac':>7s} | {'syncbn(torch in)':>16s} {'ratio':>6s}")
    for name, r in results.items():
        for op in ("fwd", "fwd+bwd"):
            t, s, st = r[op]["torch"], r[op]["syncbn"], r[op]["syncbn_torch"]
            for k in ("torch", "syncbn", "syncbn_torch"):
                r[op][k]["bw_fraction"] = r[op][k]["GBps_median"] / ref_gbps
                r[op][k]["bw_fraction_vs_same_size_copy"] = r[op][k]["GBps_median"] / case_gbps
            ms = lambda d: f"{d['median_s'] * 1e3:7.3f} ({d['min_s'] * 1e3:6.3f})"  # noqa: E731
            print(f"  {name:19s} {op:7s} {ms(t):>16s} {ms(s):>16s} {s['ratio_median']:6.3f} "
                  f"{s['ratio_min']:6.3f} {s['ratio_paired_median']:6.3f} "
                  f"{s['bw_fraction']:7.1%} | {ms(st):>16s} {st['ratio_median']:6.3f}")
    print("  during the cases: " + "; ".join(
        f"{n.split()[0]} {r['contention']['others_cpu_fraction']:.0%} other CPU use, "
        f"{r['contention']['steal_fraction']:.0%} steal" for n, r in results.items()))
    print("  minor page faults per call, median, torch/syncbn: " + "; ".join(
        f"{n.split()[0]} {op} {r[op]['torch']['page_faults_per_call_median']:.0f}/"
        f"{r[op]['syncbn']['page_faults_per_call_median']:.0f}"
        for n, r in results.items() for op in ("fwd", "fwd+bwd")))
    print("  2-D: its 1 MiB working set stays in cache, so its bw frac is no memory figure")
    print(f"  bw frac: syncbn's bytes (fwd 12, fwd+bwd 32 B/elem) per median time over the "
          f"reference copy; over the {bw_case['array_MiB']:.1f} MiB copy instead: " + "; ".join(
              f"{n.split()[0]} {r['fwd']['syncbn']['bw_fraction_vs_same_size_copy']:.0%} / "
              f"{r['fwd+bwd']['syncbn']['bw_fraction_vs_same_size_copy']:.0%}"
              for n, r in results.items() if "breakdown" in r))
    print("  agreement syncbn vs torch (max abs diff): " + "; ".join(
        f"{n.split()[0]} y {r['agree']['max_abs_dy']:.1e} dx {r['agree']['max_abs_dx']:.1e}"
        for n, r in results.items()))

    print("\nwhere syncbn's time goes: each primitive alone, GB/s of the bytes it must move "
          "(median)")
    names = list(next(iter(r["breakdown"] for r in results.values() if "breakdown" in r)))
    cols = [n for n, r in results.items() if "breakdown" in r]
    print(f"  {'':40s}" + "".join(f"{c.split()[0]:>10s}" for c in cols))
    for k in names:
        print(f"  {k:40s}" + "".join(
            f"{results[c]['breakdown'][k]['GBps_median']:10.1f}" for c in cols))

    mpi = None
    if not args.no_mpi:
        with Contention() as load:
            mpi = run_mpi(reps)
        mpi["contention"] = load.as_dict()
        if load.noisy:
            noisy.append("MPI")
        print("\n2-rank MPI (mpiexec -n 2, SYNCBN_NUM_THREADS=1 per rank on this "
              f"{os.cpu_count()}-CPU machine), fwd+bwd on (16,64,56,56) per rank:")
        if "error" in mpi:
            print("  FAILED: " + mpi["error"] + "\n" + mpi["stderr"])
        else:
            for key in ("rank0", "slowest_rank"):
                d = mpi[key]
                print(f"  {key:13s} local {d['local']['median_s'] * 1e3:7.3f} ms  mpi "
                      f"{d['mpi']['median_s'] * 1e3:7.3f} ms  overhead {d['overhead']:+.1%}")
            lat = ", ".join(f"{v * 1e6:.1f}" for v in mpi["allreduce_2C+1_median_s_per_rank"])
            print(f"  bare all-reduce of 129 float64: median {lat} us per rank")
            print(f"  (measured with the ranks' own CPU time excluded: {load})")

    # Targets.
    nchw, nhwc = results["NCHW (32,64,56,56)"], results["NHWC (32,56,56,64)"]
    targets = []

    def target(what, value, goal, ok, fmt):
        targets.append({"target": what, "value": value, "goal": goal, "status": mark(ok)})
        print(f"  {mark(ok)}  {what:44s} {fmt(value):>8s}   target {goal}")

    print("\ntargets")
    pct = lambda v: f"{v:.1%}"  # noqa: E731
    x3 = lambda v: f"{v:.3f}x"  # noqa: E731
    v = nchw["fwd+bwd"]["syncbn"]["ratio_median"]
    target("NCHW fwd+bwd time vs torch", v, f"<= {TARGET_NCHW_FWDBWD}x",
           v <= TARGET_NCHW_FWDBWD, x3)
    v = nhwc["fwd+bwd"]["syncbn"]["ratio_median"]
    target("NHWC fwd+bwd time vs torch", v, f"<= {TARGET_NHWC_FWDBWD}x",
           v <= TARGET_NHWC_FWDBWD, x3)
    for name, r in (("NCHW", nchw), ("NHWC", nhwc)):
        for op in ("fwd", "fwd+bwd"):
            v = r[op]["syncbn"]["bw_fraction"]
            target(f"{name} {op} fraction of copy bandwidth", v,
                   f">= {TARGET_BW_FRACTION:.0%}", v >= TARGET_BW_FRACTION, pct)
    if mpi and "error" not in mpi:
        v = mpi["slowest_rank"]["overhead"]
        target("2-rank MPI overhead over local (slowest rank)", v,
               f"<= {TARGET_MPI_OVERHEAD:.0%}", v <= TARGET_MPI_OVERHEAD, pct)

    if noisy:
        print(f"  WARNING: other processes used > {NOISY:.0%} of the CPUs during: "
              f"{', '.join(noisy)}; those figures are unreliable, run again on a quiet machine")
    meta["noisy_sections"] = noisy
    meta["wall_s"] = time.perf_counter() - t_start
    print(f"\n(total {meta['wall_s']:.0f} s)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "bandwidth": bw_ref, "cases": results, "mpi": mpi,
                       "targets": targets}, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
