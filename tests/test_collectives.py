"""DESIGN.md, "Collectives: order, fingerprint, validation", in one process: what every
all-reduce carries, the verdict every rank reaches from the reduced values alone, and the
validation of what a communicator hands back (nothing written when it fails). The same
under real mpiexec/torchrun: tests/test_faults.py."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import syncbn
import syncbn.torch as sbt
from syncbn.numpy import SyncBatchNorm

C = 3
FP = 16  # fingerprint slots


def rng(seed):
    return np.random.default_rng(seed)


# ---- the fingerprint -------------------------------------------------------------------


def stats(x, axis=1, layer=0, call=1):
    return syncbn.batch_norm_stats(x, axis=axis, layer=layer, call=call)


def test_every_buffer_carries_count_and_fingerprint_and_both_directions_match_in_length():
    x = rng(1).standard_normal((5, C, 4))
    buf = stats(x)
    assert buf.shape == (2 * C + 1 + FP,)
    assert buf[2 * C] == 20  # the count, then the fingerprint
    fp = buf[2 * C + 1:]
    assert fp[0] == 1 and fp[1] == 0  # one rank, finite payload
    v, v2 = fp[2:9], fp[9:16]
    assert v[0] == 1  # forward
    assert np.all(v == np.round(v)) and np.all((0 <= v) & (v <= 255))
    np.testing.assert_array_equal(v2, v * v)
    mean, invstd, _, _ = syncbn.batch_norm_gather_stats(buf)
    sums, _, _ = syncbn.batch_norm_backward_reduce(x, x, mean, invstd)
    assert sums.shape == buf.shape
    assert sums[2 * C] == 20 and sums[2 * C + 1 + 2] == 2  # backward


def test_the_fingerprint_tells_layer_axis_channels_and_call_apart():
    x = rng(2).standard_normal((4, C, C))
    a = stats(x, layer=7)[2 * C + 3:2 * C + 9]  # hash bytes
    np.testing.assert_array_equal(a, stats(x, layer=7)[2 * C + 3:2 * C + 9])  # the same call
    assert not np.array_equal(a, stats(x, layer=7, call=2)[2 * C + 3:2 * C + 9])  # the next
    assert not np.array_equal(stats(x, layer=8), stats(x, layer=9))
    # The same C on another channel axis.
    b1 = syncbn.batch_norm_stats(x, axis=1, layer=11)
    b2 = syncbn.batch_norm_stats(x, axis=2, layer=12)
    assert not np.array_equal(b1[2 * C + 3:], b2[2 * C + 3:])


def reduce(*bufs):
    """What any SUM communicator gives every rank."""
    return np.sum(bufs, axis=0)


def test_a_rank_a_call_ahead_is_caught():
    # Calls 1, 2, 2 of one layer, as three ranks would send them if one were a call ahead.
    x = rng(0).standard_normal((3, C, 2))
    layer = next(_fresh)
    bufs = [stats(x, layer=layer, call=c) for c in (1, 2, 2)]
    with pytest.raises(syncbn.CollectiveMismatchError, match="ranks disagree"):
        syncbn.batch_norm_gather_stats(reduce(*bufs))



def test_the_error_type_survives_loading_every_extension():
    """build_info() loads syncbn._cuda where it was built; that module registers its own
    exception translator, which nanobind tries before _core's. A mismatch must still be a
    CollectiveMismatchError (CI once saw a bare RuntimeError after build_info()). In a fresh
    process, so the order of the tests does not matter."""
    import subprocess
    import sys

    code = (
        "import numpy as np, syncbn\n"
        "syncbn.build_info()\n"
        "x = np.ones((2, 3, 2))\n"
        "b = [syncbn.batch_norm_stats(x, layer=1, call=c) for c in (1, 2)]\n"
        "try:\n"
        "    syncbn.batch_norm_gather_stats(b[0] + b[1])\n"
        "except syncbn.CollectiveMismatchError:\n"
        "    print('mismatch', syncbn.build_info()['cuda'])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("mismatch"), out.stderr

_fresh = itertools.count(10_000)


def _rank_buffers(n_ranks, layer_of_rank):
    """Buffers as separate ranks would send them: rank r's statistics of its own batch,
    fingerprinted as the first call of layer layer_of_rank[r]."""
    return [stats(rng(100 + r).standard_normal((2 + r, C, 3)), layer=layer_of_rank[r])
            for r in range(n_ranks)]


@pytest.mark.parametrize("pattern", [(0, 0), (0, 0, 0), (0, 1), (0, 2, 1), (1, 0, 0),
                                     (0, 0, 1, 0), (2, 2, 0, 1)])
def test_every_rank_reaches_the_same_verdict_from_the_reduced_values(pattern):
    """Ranks with fingerprints (0, 2, 1) must not pass on any rank: their sum equals three
    times the middle value. The verdict uses only the reduced buffer, which every rank
    holds identically, so it is the same everywhere."""
    ids = {k: next(_fresh) for k in set(pattern)}
    bufs = _rank_buffers(len(pattern), [ids[k] for k in pattern])
    total = reduce(*bufs)
    if len(set(pattern)) == 1:
        _, _, _, count = syncbn.batch_norm_gather_stats(total.copy())
        assert count == sum(b[2 * C] for b in bufs)
    else:
        with pytest.raises(syncbn.CollectiveMismatchError):
            syncbn.batch_norm_gather_stats(total.copy())


def test_a_forward_meeting_a_backward_is_a_mismatch_not_a_transport_error():
    x = rng(3).standard_normal((4, C, 2))
    f = stats(x, layer=next(_fresh))
    m, s, _, _ = syncbn.batch_norm_gather_stats(f.copy())
    b, _, _ = syncbn.batch_norm_backward_reduce(x, x, m, s)
    assert b.shape == f.shape
    with pytest.raises(syncbn.CollectiveMismatchError):
        syncbn.batch_norm_gather_stats(f + b)


def test_a_backward_buffer_passed_to_gather_stats_is_named():
    x = rng(4).standard_normal((4, C, 2))
    m, s, _, _ = syncbn.batch_norm_gather_stats(stats(x))
    b, _, _ = syncbn.batch_norm_backward_reduce(x, x, m, s)
    with pytest.raises(ValueError, match="^buffer: expected forward statistics"):
        syncbn.batch_norm_gather_stats(b)


def test_mismatch_names_layer_operation_and_what_this_rank_had_and_writes_nothing():
    class OtherLayerComm:
        """A pretend world of two whose other rank reduces another layer's forward."""

        rank, size = 0, 2

        def __init__(self, other):
            self.other = other

        def allreduce(self, buf):
            buf += self.other

    x = rng(5).standard_normal((6, C, 4))
    other = stats(rng(6).standard_normal((6, C, 4)), layer=next(_fresh))
    bn = sbt.SyncBatchNorm(C, comm=OtherLayerComm(other))
    bn.layer_name = "encoder.block2.bn"
    rm, rv, nbt = (bn.running_mean.clone(), bn.running_var.clone(),
                   bn.num_batches_tracked.clone())
    with pytest.raises(syncbn.CollectiveMismatchError) as e:
        bn(torch.from_numpy(x).float())
    msg = str(e.value)
    assert isinstance(e.value, RuntimeError)
    assert "layer 'encoder.block2.bn'" in msg and "forward statistics" in msg
    assert "its synchronized call 1" in msg and f"C={C} channels on axis 1" in msg
    assert "<python rank 0 of 2>" in msg
    assert torch.equal(bn.running_mean, rm) and torch.equal(bn.running_var, rv)
    assert torch.equal(bn.num_batches_tracked, nbt)


def test_the_switch_turns_the_verdict_off_but_not_the_validation():
    bufs = _rank_buffers(2, [next(_fresh), next(_fresh)])
    syncbn.set_fingerprint(False)
    try:
        assert not syncbn.fingerprint_enabled()
        syncbn.batch_norm_gather_stats(reduce(*bufs))  # ranks disagree, nobody judges it
        bad = reduce(*bufs)
        bad[2 * C] = -1
        with pytest.raises(ValueError, match="count is -1"):
            syncbn.batch_norm_gather_stats(bad)
    finally:
        syncbn.set_fingerprint(True)
    with pytest.raises(syncbn.CollectiveMismatchError):
        syncbn.batch_norm_gather_stats(reduce(*_rank_buffers(2, [next(_fresh), next(_fresh)])))


def test_the_switch_from_the_environment(tmp_path):
    import subprocess
    import sys

    code = "import syncbn; print(syncbn.fingerprint_enabled())"
    for env, want in (("0", "False"), ("off", "False"), ("1", "True")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={"SYNCBN_FINGERPRINT": env, "PATH": "/usr/bin:/bin"},
                             check=True)
        assert out.stdout.strip() == want


# ---- validation of what the communicator hands back -------------------------------------


class BadComm:
    """A pretend world of two that mangles the reduced buffer with `fix(buf, C)` after a
    correct 'sum' (its other rank holds the same batch)."""

    rank, size = 0, 2

    def __init__(self, fix):
        self.fix = fix

    def allreduce(self, buf):
        buf *= 2
        self.fix(buf, (buf.size - 1 - FP) // 2)


def _set_count(v):
    def fix(buf, c):
        buf[2 * c] = v
    return fix


def _nan_sum(buf, c):
    buf[1] = np.nan


def _no_sum(buf, c):
    buf /= 2  # returned as it came: size 2, one rank's contributions


BAD = {
    "count 0 while this rank has data": (_set_count(0), "count is 0, expected a whole number"),
    "negative count": (_set_count(-24.0), "count is -24"),
    "NaN count": (_set_count(np.nan), "count is nan"),
    "count below this rank's": (_set_count(3.0), r"count is 3, expected a whole number >= 24"),
    "fractional count": (_set_count(24.5), "count is 24.5"),
    "non-finite sums from finite inputs": (_nan_sum, "non-finite sum .* although every"),
    "not summed across the ranks": (_no_sum, r"summed 1 ranks' contributions, expected 2"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_reduction_raises_naming_the_communicator_and_writes_nothing(case):
    fix, match = BAD[case]
    x = rng(7).standard_normal((6, C, 4)).astype(np.float32)  # 24 values per channel
    bn = SyncBatchNorm(C, comm=BadComm(fix))
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    with pytest.raises(RuntimeError, match=r"comm <python rank 0 of 2>: .*" + match):
        bn.forward(x)
    assert np.array_equal(bn.running_mean, rm) and np.array_equal(bn.running_var, rv)
    assert bn.num_batches_tracked == 0
    with pytest.raises(RuntimeError, match="^backward: expected a successful forward"):
        bn.backward(np.ones_like(x))


@pytest.mark.parametrize("case", ["count 0 while this rank has data", "NaN count",
                                  "non-finite sums from finite inputs",
                                  "not summed across the ranks"])
def test_a_bad_backward_reduction_writes_no_gradients(case):
    fix, match = BAD[case]
    calls = []

    def second_only(buf, c):
        calls.append(1)
        if len(calls) == 2:  # the backward's all-reduce
            fix(buf, c)

    x = torch.from_numpy(rng(8).standard_normal((6, C, 4))).requires_grad_(True)
    bn = sbt.SyncBatchNorm(C, comm=BadComm(second_only)).double()
    y = bn(x)
    with pytest.raises(RuntimeError, match="comm <python rank 0 of 2>: "):
        y.sum().backward()
    assert x.grad is None and bn.weight.grad is None and bn.bias.grad is None


def test_a_backward_reduced_over_another_count_than_the_forward_is_refused():
    def fix(buf, c):
        if fix.n == 1:
            buf[2 * c] += 2  # a whole count, >= this rank's, but not the forward's
        fix.n += 1
    fix.n = 0
    x = torch.from_numpy(rng(9).standard_normal((6, C, 4))).requires_grad_(True)
    bn = sbt.SyncBatchNorm(C, comm=BadComm(fix)).double()
    with pytest.raises(RuntimeError, match="backward all-reduce counted 50 values per "
                                           "channel, but the forward counted 48"):
        bn(x).sum().backward()


def test_non_finite_input_on_a_rank_propagates_like_torch_instead_of_raising():
    x = rng(10).standard_normal((6, C, 4))
    x[0, 1, 0] = np.inf
    rm, rv = np.zeros(C), np.ones(C)
    y, _ = syncbn.batch_norm_forward(x, None, None, rm, rv, comm=BadComm(lambda b, c: None))
    ref = torch.nn.functional.batch_norm(torch.from_numpy(x), torch.zeros(C, dtype=torch.float64),
                                         torch.ones(C, dtype=torch.float64),
                                         training=True)
    assert np.isnan(y[:, 1]).all() and np.isnan(ref[:, 1].numpy()).all()
    assert np.isfinite(y[:, [0, 2]]).all()


def test_gather_stats_validates_a_user_buffer():
    buf = stats(rng(11).standard_normal((4, C, 2)))
    for v, match in ((-5.0, "count is -5"), (2.5, "count is 2.5"), (np.inf, "count is inf")):
        b = buf.copy()
        b[2 * C] = v
        rm = np.zeros(C)
        with pytest.raises(ValueError, match=f"^buffer: the all-reduced {match}"):
            syncbn.batch_norm_gather_stats(b, rm)
        assert not rm.any()
    for n, match in ((0, "shape \\(0,\\)"), (2 * C + 1, f"shape \\({2 * C + 1},\\)")):
        with pytest.raises(ValueError, match="^buffer: expected a 1-D stats buffer of "
                                             "stats_buffer_size.*got " + match):
            syncbn.batch_norm_gather_stats(np.zeros(n))


def test_backward_elemt_validates_user_sums_and_count():
    x = rng(12).standard_normal((4, C, 2))
    m, s, _, count = syncbn.batch_norm_gather_stats(stats(x))
    sums, _, _ = syncbn.batch_norm_backward_reduce(x, x, m, s)
    for bad, match in ((-5, "count: expected the global count per channel \\(a whole number"),
                       (8.5, "count: expected the global count per channel"),
                       (9, "count: expected the global count the backward sums were reduced "
                           "over \\(8")):
        with pytest.raises(ValueError, match=f"^{match}"):
            syncbn.batch_norm_backward_elemt(x, x, m, s, None, sums, bad)
    broken = sums.copy()
    broken[2 * C + 1] = 0.5  # half a rank's contributions
    with pytest.raises(ValueError, match="^buffer: expected an all-reduced buffer"):
        syncbn.batch_norm_backward_elemt(x, x, m, s, None, broken, count)
