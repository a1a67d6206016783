"""Runs PyTorch's own BatchNorm tests against syncbn's SyncBatchNorm, and against torch's own
class as the baseline, and prints what differs.

    python tests/torch_upstream/run_upstream.py --pytorch ~/src/pytorch      # a checkout
    python tests/torch_upstream/run_upstream.py --test-nn test_nn.py --test-modules test_modules.py

Runs ``test/test_nn.py -k batchnorm`` (pytest's -k is case-insensitive: every ``*batchnorm*`` /
``*BatchNorm*`` test, the generated ``test_BatchNorm*`` module tests included) and
``test/test_modules.py -k BatchNorm`` (the module_db entries nn.BatchNorm1d/2d/3d), each twice:
with ``torch.nn.BatchNorm1d/2d/3d``, ``torch.nn.SyncBatchNorm`` and the module_db entries
swapped for syncbn's classes (tests/torch_upstream/swap.py), and unchanged. Every assertion
and tolerance is PyTorch's. A test is then: passed, skipped (with its reason, e.g. CUDA),
failed with torch's class too (not ours to fix), or a genuine difference (passes with torch's
class, fails with syncbn's). Needs pytest, expecttest and hypothesis (imported by test_nn.py);
use the test files of the torch version installed. Exit status 1 if there is a genuine
difference not listed in KNOWN_DIFFERENCES (the README's deliberate differences).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITES = {"test_nn.py": "batchnorm", "test_modules.py": "BatchNorm"}

# Deliberate differences (README, "PyTorch's own tests"): test id -> reason.
KNOWN_DIFFERENCES: dict[str, str] = {}


def run_suite(path: Path, keyword: str, mode: str, timeout: int, extra) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        env = dict(os.environ, SYNCBN_UPSTREAM_MODE=mode, SYNCBN_UPSTREAM_REPORT=str(report),
                   PYTHONPATH=os.pathsep.join([str(HERE), str(path.parent),
                                               os.environ.get("PYTHONPATH", "")]))
        # PyTorch's own conftest.py and pytest.ini are left out: they need plugins of
        # PyTorch's CI; the tests themselves need only torch.testing._internal.
        cmd = [sys.executable, "-m", "pytest", str(path), "-k", keyword, "-p", "upstream_plugin",
               "-c", str(ini), "--rootdir", str(path.parent), "--noconftest",
               "-p", "no:cacheprovider", "-q", "--tb=line", "-o", "timeout=0", *extra]
        proc = subprocess.run(cmd, env=env, cwd=path.parent, capture_output=True, text=True,
                              timeout=timeout)
        if not report.exists():
            sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
            raise SystemExit(f"{path.name} ({mode}): pytest wrote no report (exit "
                             f"{proc.returncode})")
        return json.loads(report.read_text())


def _counts(results):
    return collections.Counter(r["outcome"] for r in results.values())


def _fmt(c):
    return ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "skipped", "xfailed", "xpassed")
                     if c[k])


def summarize(name, ours, base):
    print(f"\n=== {name}: {len(ours)} tests")
    print(f"  syncbn's class: {_fmt(_counts(ours))}")
    print(f"  torch's class : {_fmt(_counts(base))}")
    exercised = sum(1 for r in ours.values() if r.get("built", 0) > 0)
    print(f"  tests that built a syncbn module: {exercised} (the others test F.batch_norm, "
          "CUDA-only paths skipped before building one, or torch's class by name)")
    skips = collections.Counter(r.get("reason", "")[:110] for r in ours.values()
                                if r["outcome"] == "skipped")
    if skips:
        print("  skipped (syncbn's class), by reason:")
        for reason, n in skips.most_common():
            print(f"    {n:4d}  {reason}")
    both, genuine = [], []
    for test, r in sorted(ours.items()):
        if r["outcome"] != "failed":
            continue
        b = base.get(test, {}).get("outcome")
        (both if b == "failed" else genuine).append((test, r, b))
    if both:
        print(f"  failed with torch's class too ({len(both)}):")
        for test, r, _ in both:
            print(f"    {test}\n        {r.get('reason', '')[:200]}")
    new = [g for g in genuine if g[0] not in KNOWN_DIFFERENCES]
    print(f"  genuine differences ({len(genuine)}; {len(genuine) - len(new)} listed as "
          "deliberate in the README):")
    for test, r, b in genuine:
        tag = "deliberate" if test in KNOWN_DIFFERENCES else "NEW"
        print(f"    [{tag}] {test} (torch: {b})\n        {r.get('reason', '')[:300]}")
    return new


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pytorch", type=Path, help="a PyTorch source checkout (uses its test/)")
    ap.add_argument("--test-nn", type=Path, help="path to test_nn.py")
    ap.add_argument("--test-modules", type=Path, help="path to test_modules.py")
    ap.add_argument("--modes", default="ours,torch",
                    help="ours (syncbn's class), torch (the baseline), or both (default)")
    ap.add_argument("--json", type=Path, help="write every test's results here")
    ap.add_argument("--timeout", type=int, default=3600, help="seconds per pytest run")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    a = ap.parse_args(argv)
    files = {}
    if a.pytorch:
        files = {n: a.pytorch / "test" / n for n in SUITES}
    if a.test_nn:
        files["test_nn.py"] = a.test_nn
    if a.test_modules:
        files["test_modules.py"] = a.test_modules
    if not files:
        ap.error("give --pytorch or --test-nn/--test-modules")
    modes = a.modes.split(",")
    out, new = {}, []
    for name, path in files.items():
        if not path.exists():
            ap.error(f"{path}: no such file")
        res = {m: run_suite(path.resolve(), SUITES[name], m, a.timeout, a.pytest_args)
               for m in modes}
        out[name] = res
        if "ours" in res:
            new += summarize(name, res["ours"], res.get("torch", {}))
        else:
            print(f"\n=== {name} (torch's class): {_fmt(_counts(res['torch']))}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, sort_keys=True))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
