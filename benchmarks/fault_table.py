"""The fault table of RESULTS.md: each fault of tests/workers/faults.py injected on the last
rank of a real job, under `mpiexec -n 2 python -m mpi4py` and `torchrun --nproc_per_node 2`
(gloo), with the outcome every process reported and the seconds from the fault until every
process was gone.

    .venv/bin/python benchmarks/fault_table.py [--json PATH]

Fingerprinted faults (another channel axis, a layer in eval, another layer order, a
skipped layer) all run in one job, one after the other: the time is from the job's start,
since every rank raises at the collective itself. The others end the job: the time is from
the faulty rank's FAULT-AT stamp to the launcher's exit. MPI jobs get
SYNCBN_COLLECTIVE_TIMEOUT=5 where only a timeout can end them (a rank exiting 0, a whole
step in eval); torchrun workers get init_process_group(timeout=30 s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "workers" / "faults.py"
BIN = Path(sys.executable).parent
FINGERPRINTED = "agree,axis,train_flag,layer_order,skip_layer,agree"
ENDING = ["bad_input", "exception", "sigkill", "exit0", "eval_step"]


def launch(launcher, scenario):
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", GLOO_TIMEOUT="30",
               MPIEXEC_TIMEOUT="120", SYNCBN_COLLECTIVE_TIMEOUT="5")
    if launcher == "mpiexec":
        cmd = [str(BIN / "mpiexec"), "-n", "2", sys.executable, "-m", "mpi4py", str(WORKER),
               scenario]
    else:
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", str(WORKER),
               scenario]
    t0 = time.time()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                       cwd=WORKER.parent)
    return p, t0, time.time()


def outcome(p, scenario):
    out = p.stdout + p.stderr
    lines = re.findall(rf"^OUTCOME rank=(\d) scenario={scenario} error=(\w+)", p.stdout, re.M)
    seen = sorted({f"rank {r}: {e}" for r, e in lines})
    if "did not complete within" in out:
        seen.append("others: timeout naming the layer")
    if "Connection closed by peer" in out:
        seen.append("others: gloo 'Connection closed by peer'")
    if "KILLED BY SIGNAL: 9" in out or "Signal 9 (SIGKILL)" in out:
        seen.append("launcher reports SIGKILL")
    if "MPI_Abort" in out:
        seen.append("MPI_Abort ends the job")
    return "; ".join(seen) or f"exit {p.returncode}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    rows = []
    for launcher in ("mpiexec", "torchrun"):
        p, t0, t1 = launch(launcher, FINGERPRINTED)
        for name in FINGERPRINTED.split(",")[1:-1]:
            rows.append(dict(launcher=launcher, fault=name, outcome=outcome(p, name),
                             seconds=None, job_seconds=t1 - t0, rc=p.returncode))
        for name in ENDING:
            p, t0, t1 = launch(launcher, name)
            at = re.search(r"^FAULT-AT rank=1 time=([\d.]+)$", p.stdout, re.M)
            rows.append(dict(launcher=launcher, fault=name, outcome=outcome(p, name),
                             seconds=t1 - float(at[1]) if at else None, job_seconds=t1 - t0,
                             rc=p.returncode))
    print(f"{'launcher':9s} {'fault':12s} {'s after fault':>13s} {'job s':>6s}  outcome")
    for r in rows:
        s = f"{r['seconds']:.1f}" if r["seconds"] is not None else "(at once)"
        print(f"{r['launcher']:9s} {r['fault']:12s} {s:>13s} {r['job_seconds']:6.1f}  "
              f"{r['outcome']}")
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
