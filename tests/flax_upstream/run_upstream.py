"""Runs Flax's own BatchNorm tests against syncbn's classes, and against Flax's own as the
baseline, and prints what differs.

    python tests/flax_upstream/run_upstream.py --flax ~/src/flax            # a checkout
    python tests/flax_upstream/run_upstream.py --git-dir flax.git --rev v0.12.8

The flax wheel does not ship its tests. From a checkout (or a git directory and revision,
whose test files are extracted to a temporary folder) this runs
``tests/nnx/nn/normalization_test.py -k "batchnorm or spectralnorm"`` (nnx.BatchNorm beside
linen.BatchNorm; SpectralNorm over a Sequential holding a BatchNorm) and
``tests/linen/linen_test.py -k batch_norm``, each twice: with ``flax.nnx.BatchNorm`` and
``flax.linen.BatchNorm`` swapped for ``syncbn.flax.BatchNorm`` and
``syncbn.flax.LinenBatchNorm`` (tests/flax_upstream/upstream_plugin.py), and unchanged.
Every assertion and tolerance is Flax's. A world of one: syncbn's default communicator when
not under MPI. A test is then: passed, skipped, failed with Flax's class too, or a genuine
difference (passes with Flax's class, fails with syncbn's). Needs pytest, absl-py and optax
(linen_test.py imports it); use the test files of the flax version installed. Exit status 1
if there is a genuine difference not listed in KNOWN_DIFFERENCES (the README's).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent

SUITES = {"tests/nnx/nn/normalization_test.py": "batchnorm or spectralnorm",
          "tests/linen/linen_test.py": "batch_norm"}

# Deliberate differences (README, "Flax's own tests"): test name without absl's parameter
# index -> (what syncbn's failure says, why).
KNOWN_DIFFERENCES: dict[str, tuple[str, str]] = {
    "test_batch_norm_complex": (
        "x: expected float16, bfloat16, float32 or float64, got complex64",
        "complex inputs: the core's kernels are real"),
    "test_batch_norm_multi_init": (
        "axis_name, axis_index_groups: syncbn's BatchNorm synchronizes across processes",
        "axis_name is flax's own pmap/shard_map synchronization; syncbn's is `comm`"),
}


def _name(test_id):
    return re.sub(r"\d+$", "", test_id.rsplit("::", 1)[-1])


def run_suite(root: Path, rel: str, mode: str, timeout: int, extra) -> dict:
    path = root / rel
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        ini = Path(tmp) / "pytest.ini"
        ini.write_text("[pytest]\n")
        env = dict(os.environ, SYNCBN_UPSTREAM_MODE=mode, SYNCBN_UPSTREAM_REPORT=str(report),
                   PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
        # Flax's conftest.py and pyproject settings are left out; the tests need only flax,
        # absl and optax.
        cmd = [sys.executable, "-m", "pytest", str(path), "-k", SUITES[rel],
               "-p", "upstream_plugin", "-c", str(ini), "--rootdir", str(path.parent),
               "--noconftest", "-p", "no:cacheprovider", "-q", "--tb=line", "-W", "ignore",
               *extra]
        proc = subprocess.run(cmd, env=env, cwd=path.parent, capture_output=True, text=True,
                              timeout=timeout)
        if not report.exists():
            sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
            raise SystemExit(f"{rel} ({mode}): pytest wrote no report (exit "
                             f"{proc.returncode})")
        return json.loads(report.read_text())


def _counts(results):
    return collections.Counter(r["outcome"] for r in results.values())


def _fmt(c):
    return ", ".join(f"{c[k]} {k}" for k in ("passed", "failed", "skipped") if c[k]) or "none"


def summarize(rel, ours, base):
    print(f"\n=== {rel} -k {SUITES[rel]!r}: {len(ours)} tests")
    print(f"  syncbn's classes: {_fmt(_counts(ours))}")
    print(f"  flax's classes  : {_fmt(_counts(base))}")
    built = collections.Counter()
    for r in ours.values():
        for kind, n in r.get("built", {}).items():
            built[kind] += n > 0
    print(f"  tests that built syncbn's nnx.BatchNorm: {built['nnx']}, linen.BatchNorm: "
          f"{built['linen']}")
    both, genuine = [], []
    for test, r in sorted(ours.items()):
        if r["outcome"] != "failed":
            continue
        b = base.get(test, {}).get("outcome")
        (both if b == "failed" else genuine).append((test, r, b))
    if both:
        print(f"  failed with flax's class too ({len(both)}):")
        for test, r, _ in both:
            first = (r.get("reason", "").strip().splitlines() or [""])[0]
            print(f"    {test}\n        {first[:200]}")
    new = []
    for test, r, _ in genuine:
        known = KNOWN_DIFFERENCES.get(_name(test))
        if not (known and re.search(known[0], r.get("reason", ""))):
            new.append(test)
    print(f"  genuine differences ({len(genuine)}; {len(genuine) - len(new)} listed as "
          "deliberate in the README):")
    for test, r, b in genuine:
        tag = "NEW" if test in new else "deliberate"
        first = (r.get("reason", "").strip().splitlines() or [""])[0]
        print(f"    [{tag}] {test} (flax: {b})\n        {first[:300]}")
    return new


def _extract(git_dir: Path, rev: str, dest: Path) -> Path:
    for rel in SUITES:
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"{rev}:{rel}"],
                              check=True, capture_output=True, text=True).stdout
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        (dest / rel).write_text(text)
    return dest


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flax", type=Path, help="a Flax source checkout (uses its tests/)")
    ap.add_argument("--git-dir", type=Path, help="a Flax git directory (with --rev)")
    ap.add_argument("--rev", default="HEAD", help="the revision of --git-dir (default HEAD)")
    ap.add_argument("--modes", default="ours,flax",
                    help="ours (syncbn's classes), flax (the baseline), or both (default)")
    ap.add_argument("--json", type=Path, help="write every test's results here")
    ap.add_argument("--timeout", type=int, default=1800, help="seconds per pytest run")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --)")
    a = ap.parse_args(argv)
    if (a.flax is None) == (a.git_dir is None):
        ap.error("give --flax or --git-dir")
    with tempfile.TemporaryDirectory() as tmp:
        root = a.flax.resolve() if a.flax else _extract(a.git_dir, a.rev, Path(tmp))
        if a.git_dir:
            sha = subprocess.run(["git", "--git-dir", str(a.git_dir), "rev-parse", a.rev],
                                 check=True, capture_output=True, text=True).stdout.strip()
            print(f"flax tests from {a.git_dir} at {a.rev} ({sha})")
        modes = a.modes.split(",")
        out, new = {}, []
        for rel in SUITES:
            if not (root / rel).exists():
                ap.error(f"{root / rel}: no such file")
            res = {m: run_suite(root, rel, m, a.timeout, a.pytest_args) for m in modes}
            out[rel] = res
            if "ours" in res:
                new += summarize(rel, res["ours"], res.get("flax", {}))
            else:
                print(f"\n=== {rel} (flax's classes): {_fmt(_counts(res['flax']))}")
    if a.json:
        a.json.write_text(json.dumps(out, indent=1, sort_keys=True))
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
