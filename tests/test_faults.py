"""Never silently wrong, never hung (DESIGN.md, "Collectives: order, fingerprint,
validation"): faults injected on one rank of real `mpiexec` and `torchrun` (gloo) jobs.

Every process must end, within a bound asserted here, with a clear error: the
fingerprint's CollectiveMismatchError on every rank where the fault changes what the
ranks reduce, else the faulty rank's own error and the launcher ending the others (or a
collective timeout). tests/workers/faults.py holds the scenarios."""

from __future__ import annotations

import re
import time

import pytest

from conftest import WORKERS, run_mpi, run_torchrun

FAULTS = WORKERS / "faults.py"
FINGERPRINTED = ["agree", "axis", "train_flag", "layer_order", "skip_layer", "agree"]
# The layer each fingerprinted scenario fails at, as named by convert_sync_batchnorm (the
# position in the Sequential) or the functional call.
WHERE = {"axis": "functional call (layer 0)", "train_flag": "layer '4'",
         "layer_order": "layer '4'", "skip_layer": "layer '4'"}


def outcomes(out: str):
    """{(rank, scenario): (error type or 'OK', message)} from the workers' lines."""
    res = {}
    for m in re.finditer(r"^OUTCOME rank=(\d+) scenario=(\w+) error=(\w+) message=(.*)$", out,
                         re.M):
        res.setdefault((int(m[1]), m[2]), []).append((m[3], m[4]))
    for m in re.finditer(r"^OK rank=(\d+) scenario=(\w+)$", out, re.M):
        res.setdefault((int(m[1]), m[2]), []).append(("OK", ""))
    return res


def check_fingerprinted(out: str, nranks: int):
    res = outcomes(out)
    for r in range(nranks):
        assert res[(r, "agree")] == [("OK", "")] * 2, out  # before and after the faults
        for name, where in WHERE.items():
            (err, msg), = res[(r, name)]
            assert err == "CollectiveMismatchError", (r, name, out)
            assert "ranks disagree" in msg and "Nothing was written" in msg
            # Every rank names what it reduced; the ranks that agree name the layer the
            # faulty one skipped / reordered / ran in eval.
            if r != nranks - 1:
                assert where in msg, (r, name, msg)
    assert out.count("DONE") == nranks


@pytest.mark.parametrize("nranks", [2, 3])
def test_fingerprint_stops_every_rank_under_mpiexec(nranks):
    """Axis, training flag, layer order, a skipped layer: every rank raises the same
    CollectiveMismatchError at the same collective, nothing is written, and the job goes on
    in step (the last scenario agrees again), so one job covers them all."""
    t0 = time.monotonic()
    proc = run_mpi(nranks, FAULTS, ",".join(FINGERPRINTED), timeout=120)
    check_fingerprinted(proc.stdout, nranks)
    assert time.monotonic() - t0 < 120


def test_fingerprint_stops_every_rank_under_torchrun_gloo():
    proc = run_torchrun(2, FAULTS, ",".join(FINGERPRINTED), timeout=180)
    check_fingerprinted(proc.stdout, 2)


# ---- faults the launcher has to end ----------------------------------------------------

def ended_by_launcher(proc, t_end, scenario, nranks, error, bound):
    """The faulty rank reported `error` (or died), the job failed, and it was over within
    `bound` seconds of the fault."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    faulty = nranks - 1
    at = re.search(rf"^FAULT-AT rank={faulty} time=([\d.]+)$", proc.stdout, re.M)
    assert at, out[-3000:]
    if error:
        (err, msg), = outcomes(proc.stdout)[(faulty, scenario)]
        assert err == error[0] and error[1] in msg, (err, msg)
    elapsed = t_end - float(at[1])
    assert elapsed < bound, f"{scenario}: {elapsed:.1f} s after the fault\n{out[-3000:]}"
    # No rank finished as if nothing happened.
    assert "DONE" not in proc.stdout
    return elapsed


LAUNCHER_FAULTS = {
    # scenario: (the faulty rank's error, or None when it just dies)
    "bad_input": ("RuntimeError", "input: expected 4 channels"),
    "exception": ("RuntimeError", "user code failed mid-step"),
    "sigkill": None,
    "exit0": None,
}


def test_a_whole_step_in_eval_on_one_rank_is_invisible_and_ends_by_timeout():
    """The disagreement no local fingerprint can see (README, "When ranks disagree"): one
    rank runs a whole training step in eval, so it is a step behind the others, and every
    collective still agrees. No CollectiveMismatchError; the others end at the collective
    timeout, naming the layer they wait in."""
    proc = run_mpi(2, FAULTS, "eval_step", timeout=60, check=False,
                   env={"SYNCBN_COLLECTIVE_TIMEOUT": "5"})
    t_end = time.time()
    out = proc.stdout + proc.stderr
    assert "CollectiveMismatchError" not in out
    assert re.search(r"^OK rank=1 scenario=eval_step$", proc.stdout, re.M), out[-3000:]
    assert "the all-reduce did not complete within 5 s" in proc.stdout, out[-3000:]
    at = re.search(r"^FAULT-AT rank=1 time=([\d.]+)$", proc.stdout, re.M)
    assert proc.returncode != 0 and t_end - float(at[1]) < 30


@pytest.mark.parametrize("scenario", list(LAUNCHER_FAULTS))
def test_one_rank_failing_ends_the_mpiexec_job(scenario):
    """Under `python -m mpi4py` an exception on one rank aborts the job and Hydra ends the
    job when a rank is killed. A rank that exits 0 mid-job is not an error to MPI: the
    others would wait in the all-reduce forever; SYNCBN_COLLECTIVE_TIMEOUT makes them
    raise, naming the layer, and that error aborts the job."""
    nranks = 3 if scenario in ("exception", "exit0") else 2
    env = {"SYNCBN_COLLECTIVE_TIMEOUT": "5"} if scenario == "exit0" else None
    proc = run_mpi(nranks, FAULTS, scenario, timeout=60, env=env, check=False)
    t_end = time.time()
    ended_by_launcher(proc, t_end, scenario, nranks, LAUNCHER_FAULTS[scenario], bound=30)
    if scenario == "exit0":  # the others' timeout names the all-reduce they waited in
        assert re.search(r"the all-reduce of the (forward statistics|backward sums) of layer "
                         r"'\d' \(#\d\), its synchronized call \d+ failed: comm <mpi rank \d "
                         r"of 3>: the all-reduce did not complete within 5 s", proc.stdout)


@pytest.mark.parametrize("scenario", list(LAUNCHER_FAULTS))
def test_one_rank_failing_ends_the_torchrun_job(scenario):
    """torchrun ends every worker when one fails; gloo makes a peer's all-reduce fail as
    soon as a rank's connection closes (killed or exited). GLOO_TIMEOUT (the
    init_process_group timeout the worker sets) bounds the rest."""
    proc = run_torchrun(2, FAULTS, scenario, timeout=180, env={"GLOO_TIMEOUT": "30"},
                        check=False)
    t_end = time.time()
    ended_by_launcher(proc, t_end, scenario, 2, LAUNCHER_FAULTS[scenario], bound=45)
