"""DESIGN.md, Numerics / Layouts / Conventions / Communication, in one process: with a
world of one, SyncBN must equal a float64 reference of plain batch norm, for any rank,
channel axis, memory layout and floating dtype, with PyTorch's running-stat conventions
and exactly one O(C) collective per training forward and per backward."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import syncbn
from syncbn.numpy import SyncBatchNorm

from reference import (
    as_f64,
    batch_moments,
    bn_backward_ref,
    bn_eval_ref,
    bn_forward_ref,
    running_stats_ref,
)

LOCAL = syncbn.comm.local()

# (rtol, atol) per dtype; 16-bit outputs are one rounding of a float64-accurate value.
TOL = {
    np.float64: (1e-10, 1e-10),
    np.float32: (1e-5, 1e-5),
    np.float16: (2.0**-10, 2.0**-10),
}
BF16_TOL = (2.0**-7, 2.0**-7)


def rng(seed=0):
    return np.random.default_rng(seed)


def close(actual, expected, dtype):
    rtol, atol = TOL[dtype] if dtype in TOL else BF16_TOL
    np.testing.assert_allclose(as_f64(actual), as_f64(expected), rtol=rtol, atol=atol)


def check_train(x, dy, axis=1, dtype=np.float64, eps=1e-5, momentum=0.1, seed=1, affine=True):
    """Forward + backward of x against the reference, running stats included."""
    C = x.shape[axis]
    r = rng(seed)
    w = r.uniform(0.5, 1.5, C).astype(dtype) if affine else None
    b = r.standard_normal(C).astype(dtype) if affine else None
    rm0, rv0 = r.standard_normal(C), r.uniform(0.5, 2.0, C)
    rm, rv = rm0.copy(), rv0.copy()
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, momentum=momentum, eps=eps, axis=axis,
                                       comm=LOCAL)
    assert y.shape == x.shape and y.dtype == x.dtype
    close(y, bn_forward_ref(x, w, b, axis, eps), dtype)
    erm, erv = running_stats_ref(rm0, rv0, x, axis, momentum)
    np.testing.assert_allclose(rm, erm, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rv, erv, rtol=1e-12, atol=1e-12)
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    edx, edw, edb = bn_backward_ref(dy, x, w, axis, eps)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    close(dx, edx, dtype)
    if affine:
        # Sums over the batch: scale the tolerance by the count per channel.
        n = x.size // C
        rtol, atol = TOL[dtype]
        np.testing.assert_allclose(dw, edw, rtol=rtol, atol=atol * n)
        np.testing.assert_allclose(db, edb, rtol=rtol, atol=atol * n)
    else:
        assert dw is None and db is None
    return y, dx


# ---- ranks and axes -----------------------------------------------------------------

SHAPES_AXES = [
    ((16, 3), 1), ((16, 3), -1), ((5, 7), 0),
    ((6, 3, 5), 1), ((6, 3, 5), -1), ((6, 3, 5), 0),
    ((4, 3, 5, 6), 1), ((4, 3, 5, 6), 2), ((4, 3, 5, 6), -1),
    ((2, 3, 4, 5, 6), 1), ((2, 3, 4, 5, 6), 2), ((2, 3, 4, 5, 6), 3), ((2, 3, 4, 5, 6), -1),
]


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape, axis", SHAPES_AXES, ids=lambda v: str(v).replace(" ", ""))
def test_any_rank_and_channel_axis_matches_reference(shape, axis, dtype):
    r = rng(2)
    x = (r.standard_normal(shape) * 2 + 0.5).astype(dtype)
    dy = r.standard_normal(shape).astype(dtype)
    check_train(x, dy, axis, dtype)


@pytest.mark.parametrize("shape, axis", [((8, 32, 32, 16), 1), ((8, 16, 32, 32), -1),
                                         ((3, 5, 20000), 1), ((4096, 23, 5), 1),
                                         ((16, 12, 12, 100), -1), ((8, 1001, 3, 3), 1)],
                         ids=["nchw", "nhwc", "long-run", "short-runs", "nhwc-wide",
                              "few-long-rows"])
def test_large_inputs_split_over_threads_match_reference(shape, axis):
    r = rng(3)
    x = r.standard_normal(shape) * 3 - 1
    dy = r.standard_normal(shape)
    check_train(x, dy, axis, np.float64)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16], ids=["f64", "f32", "f16"])
def test_large_channels_last_backward_matches_reference(dtype):
    # Channels last, more than 1 MiB of x and dy per thread: the backward reduction runs
    # along the rows (traverse.h, reduce_rows); 67 channels leave a tail of 3 per row.
    r = rng(5)
    shape = (16, 40, 40, 67)
    x = (r.standard_normal(shape) * 2 + 1).astype(dtype).transpose(0, 3, 1, 2)
    dy = r.standard_normal(shape).astype(dtype).transpose(0, 3, 1, 2)
    assert x.nbytes * 2 > 4 * 2**20  # above the threshold for up to 4 threads
    check_train(x, dy, 1, dtype)


# ---- layouts ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("shape", [(4, 5, 6, 3), (8, 16, 16, 32)], ids=str)
def test_channels_last_memory_matches_reference_and_keeps_layout(shape, dtype):
    r = rng(4)
    nhwc = (r.standard_normal(shape) + 2).astype(dtype)
    x = nhwc.transpose(0, 3, 1, 2)  # logical NCHW, channel stride 1
    assert not x.flags.c_contiguous and x.strides[1] == x.itemsize
    dy = r.standard_normal(shape).astype(dtype).transpose(0, 3, 1, 2)
    y, dx = check_train(x, dy, 1, dtype)
    assert y.strides == x.strides and dx.strides == x.strides


def test_torch_channels_last_tensor_matches_reference_and_keeps_layout():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64)
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(4, 6, 5, 7, generator=g, dtype=torch.float64)
    y, ctx = syncbn.batch_norm_forward(x, comm=LOCAL)
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, bn_forward_ref(x), np.float64)
    dx, _, _ = syncbn.batch_norm_backward(dy, ctx)
    close(dx, bn_backward_ref(dy, x)[0], np.float64)


def _base(seed=5, shape=(10, 6, 9)):
    return rng(seed).standard_normal(shape) * 1.5 + 0.3


NON_CONTIGUOUS = {
    "step-slices": lambda a: a[::2, ::2, 1::3],
    "reversed-batch": lambda a: a[::-1],
    "reversed-channels": lambda a: a[:, ::-1],
    "reversed-all": lambda a: a[::-1, ::-1, ::-1],
    "fortran": np.asfortranarray,
    "middle-transpose": lambda a: a.transpose(2, 1, 0),
    "broadcast-batch": lambda a: np.broadcast_to(a[:1], a.shape),
    "broadcast-inner": lambda a: np.broadcast_to(a[:, :, :1], a.shape),
}


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(NON_CONTIGUOUS))
def test_non_contiguous_inputs_give_correct_results(kind, dtype):
    x = NON_CONTIGUOUS[kind](_base().astype(dtype))
    dy = rng(6).standard_normal(x.shape).astype(dtype)
    check_train(x, dy, 1, dtype)


@pytest.mark.parametrize("x_kind, dy_kind", [
    ("c", "fortran"), ("fortran", "c"), ("c", "reversed"), ("channels-last", "c"),
    ("c", "channels-last"), ("c", "broadcast"), ("step", "c"),
])
def test_dy_with_a_different_layout_than_x_gives_correct_gradients(x_kind, dy_kind):
    shape = (6, 4, 5, 3)

    def make(kind, seed):
        a = rng(seed).standard_normal(shape)
        if kind == "fortran":
            return np.asfortranarray(a)
        if kind == "reversed":
            return a[::-1, :, ::-1]
        if kind == "channels-last":
            return np.ascontiguousarray(a.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        if kind == "broadcast":
            return np.broadcast_to(a[:, :, :1, :], shape)
        if kind == "step":
            return rng(seed).standard_normal((12, 4, 10, 3))[::2, :, ::2]
        return a

    x, dy = make(x_kind, 7), make(dy_kind, 8)
    check_train(x, dy, 1, np.float64)


# ---- 16-bit floats ------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((70000, 2), 1), ((4, 2, 20000), 1),
                                         ((2, 40000, 2), -1)], ids=str)
def test_float16_counts_above_65504_are_exact(shape, axis):
    r = rng(9)
    x = (r.standard_normal(shape) * 0.5 + 3).astype(np.float16)
    dy = r.standard_normal(shape).astype(np.float16)
    C = shape[axis]
    n = x.size // C
    assert n > 65504
    rm, rv = np.zeros(C), np.ones(C)
    y, ctx = syncbn.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=axis,
                                       comm=LOCAL)
    assert ctx.count == n
    mean, _, var_u, _ = batch_moments(x, axis)
    # Statistics accumulate in fp32 or wider: far better than one 16-bit rounding.
    np.testing.assert_allclose(rm, mean, rtol=1e-5)
    np.testing.assert_allclose(rv, var_u, rtol=1e-4)
    assert y.dtype == np.float16 and np.isfinite(y).all()
    close(y, bn_forward_ref(x, axis=axis), np.float16)
    dx, _, _ = syncbn.batch_norm_backward(dy, ctx)
    assert dx.dtype == np.float16 and np.isfinite(dx).all()
    close(dx, bn_backward_ref(dy, x, axis=axis)[0], np.float16)


@pytest.mark.parametrize("shape, axis", [((64, 4, 8), 1), ((2, 9, 9, 5), -1), ((70000, 2), 1)],
                         ids=str)
def test_bfloat16_torch_tensors_match_reference(shape, axis):
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 2 + 1).to(torch.bfloat16)
    dy = torch.randn(shape, generator=g).to(torch.bfloat16)
    C = shape[axis]
    w = torch.rand(C, generator=g) + 0.5  # float32 parameters, as under autocast
    b = torch.randn(C, generator=g)
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, momentum=1.0, axis=axis, comm=LOCAL)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
    mean, _, var_u, n = batch_moments(x, axis)
    assert ctx.count == n
    np.testing.assert_allclose(rm.numpy(), mean, rtol=1e-5)
    np.testing.assert_allclose(rv.numpy(), var_u, rtol=1e-4)
    close(y, bn_forward_ref(x, w, b, axis), "bf16")
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    assert dx.dtype == torch.bfloat16 and dw.dtype == torch.float32
    edx, edw, edb = bn_backward_ref(dy, x, w, axis)
    close(dx, edx, "bf16")
    np.testing.assert_allclose(as_f64(dw), edw, rtol=1e-5, atol=1e-5 * n)
    np.testing.assert_allclose(as_f64(db), edb, rtol=1e-5, atol=1e-5 * n)


# ---- fp32 with large channel means ---------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 3), (16, 3, 64), (8, 32, 32, 3)], ids=str)
def test_float32_mean_1e4_times_std_keeps_variance_to_1e_4(shape):
    r = rng(10)
    C = shape[1] if len(shape) < 4 else shape[-1]
    axis = 1 if len(shape) < 4 else -1
    std = np.array([0.37, 3.0, 1e-2])[:C]
    bshape = [1] * len(shape)
    bshape[axis] = C
    std = std.reshape(bshape)
    x = (1e4 * std + std * r.standard_normal(shape)).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, ctx = syncbn.batch_norm_forward(x, None, None, rm, rv, momentum=1.0, axis=axis,
                                       comm=LOCAL)
    mean, _, var_u, _ = batch_moments(x, axis)
    np.testing.assert_allclose(rv, var_u, rtol=1e-4)
    np.testing.assert_allclose(rm, mean, rtol=1e-6)
    # y within a few float32 roundings of the float64 value (the float32 map keeps the
    # part of the mean that float32 cannot hold in its bias: without it this fails).
    np.testing.assert_allclose(y, bn_forward_ref(x, axis=axis), rtol=1e-5, atol=1e-4)
    dy = r.standard_normal(shape).astype(np.float32)
    dx, _, _ = syncbn.batch_norm_backward(dy, ctx)
    edx = bn_backward_ref(dy, x, axis=axis)[0]
    np.testing.assert_allclose(dx, edx, rtol=1e-4, atol=1e-4 * np.abs(edx).max())


# ---- constant channels --------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16],
                         ids=["f64", "f32", "f16"])
def test_constant_channels_give_nonnegative_variance_and_no_nan(dtype):
    r = rng(11)
    values = np.array([0.1, 1e4 / 3, -7.3, 0.0, 1 / 3])
    x = np.broadcast_to(values[None, :, None], (33, 5, 7)).astype(dtype)
    x = np.ascontiguousarray(x)
    rm, rv = np.zeros(5), np.ones(5)
    w, b = np.ones(5, dtype), np.zeros(5, dtype)
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, momentum=1.0, comm=LOCAL)
    assert (rv >= 0).all() and (rv <= 1e-10 * values**2 + 1e-300).all()
    np.testing.assert_allclose(rm, x[0, :, 0].astype(np.float64), rtol=1e-12)
    assert (ctx.invstd > 0).all() and np.isfinite(ctx.invstd).all()
    assert np.isfinite(y).all()
    np.testing.assert_allclose(y.astype(np.float64), 0.0, atol=1e-3)
    dy = r.standard_normal(x.shape).astype(dtype)
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()


def test_constant_channel_beside_varying_ones_stays_exact():
    x = _base(12, (20, 3, 6))
    x[:, 1] = 1234.5678
    dy = rng(13).standard_normal(x.shape)
    y, dx = check_train(x, dy)
    assert np.isfinite(y).all() and np.isfinite(dx).all()


# ---- running statistics -------------------------------------------------------------


@pytest.mark.parametrize("stat_dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_momentum_and_unbiased_running_variance_over_3_steps(stat_dtype):
    C, momentum = 4, 0.3
    rm, rv = np.zeros(C, stat_dtype), np.ones(C, stat_dtype)
    erm, erv = rm.astype(np.float64), rv.astype(np.float64)
    for step, n in enumerate([5, 9, 2]):
        x = rng(20 + step).standard_normal((n, C, 3)) * (step + 1) + step
        syncbn.batch_norm_forward(x, None, None, rm, rv, momentum=momentum, comm=LOCAL)
        erm, erv = running_stats_ref(erm, erv, x, 1, momentum)
    tol = 1e-12 if stat_dtype == np.float64 else 1e-6
    np.testing.assert_allclose(rm, erm, rtol=tol)
    np.testing.assert_allclose(rv, erv, rtol=tol)


def test_module_default_momentum_updates_running_stats_and_counts_batches():
    C = 3
    bn = SyncBatchNorm(C, comm=LOCAL, dtype=np.float64)
    erm, erv = np.zeros(C), np.ones(C)
    for step in range(3):
        x = rng(30 + step).standard_normal((6 + step, C, 2, 2)) * 2 + step
        bn.forward(x)
        erm, erv = running_stats_ref(erm, erv, x, 1, 0.1)
    np.testing.assert_allclose(bn.running_mean, erm, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, erv, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_module_momentum_none_is_a_cumulative_average_over_3_steps():
    C = 3
    bn = SyncBatchNorm(C, momentum=None, comm=LOCAL, dtype=np.float64)
    means, variances = [], []
    for step, n in enumerate([4, 7, 3]):
        x = rng(40 + step).standard_normal((n, C, 5)) * (step + 1) - step
        bn.forward(x)
        mean, _, var_u, _ = batch_moments(x)
        means.append(mean)
        variances.append(var_u)
        np.testing.assert_allclose(bn.running_mean, np.mean(means, axis=0), rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, np.mean(variances, axis=0), rtol=1e-12)
    assert int(bn.num_batches_tracked) == 3


def test_eval_uses_running_statistics():
    r = rng(50)
    x = r.standard_normal((6, 4, 5))
    dy = r.standard_normal(x.shape)
    w, b = r.uniform(0.5, 1.5, 4), r.standard_normal(4)
    rm, rv = r.standard_normal(4), r.uniform(0.5, 2.0, 4)
    rm0, rv0 = rm.copy(), rv.copy()
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, training=False, comm=LOCAL)
    close(y, bn_eval_ref(x, rm0, rv0, w, b), np.float64)
    assert rm.tobytes() == rm0.tobytes() and rv.tobytes() == rv0.tobytes()
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    invstd = 1 / np.sqrt(rv0 + 1e-5)
    close(dx, dy * (w * invstd)[None, :, None], np.float64)
    xhat = (x - rm0[None, :, None]) * invstd[None, :, None]
    close(dw, (dy * xhat).sum(axis=(0, 2)), np.float64)
    close(db, dy.sum(axis=(0, 2)), np.float64)


# ---- module options -----------------------------------------------------------------


def test_module_affine_false_normalizes_without_parameters():
    C = 4
    bn = SyncBatchNorm(C, affine=False, comm=LOCAL, dtype=np.float64)
    assert bn.weight is None and bn.bias is None
    r = rng(60)
    x = r.standard_normal((7, C, 3)) * 3 + 1
    dy = r.standard_normal(x.shape)
    close(bn.forward(x), bn_forward_ref(x), np.float64)
    close(bn.backward(dy), bn_backward_ref(dy, x)[0], np.float64)
    assert bn.grad_weight is None and bn.grad_bias is None


def test_functional_without_weight_and_bias_matches_reference():
    r = rng(61)
    x = r.standard_normal((7, 4, 3)) * 3 + 1
    check_train(x, r.standard_normal(x.shape), affine=False)


def test_module_affine_gradients_match_reference():
    C = 4
    bn = SyncBatchNorm(C, comm=LOCAL, dtype=np.float64)
    r = rng(62)
    bn.weight[:] = r.uniform(0.5, 1.5, C)
    bn.bias[:] = r.standard_normal(C)
    x = r.standard_normal((7, C, 3)) * 3 + 1
    dy = r.standard_normal(x.shape)
    close(bn.forward(x), bn_forward_ref(x, bn.weight, bn.bias), np.float64)
    edx, edw, edb = bn_backward_ref(dy, x, bn.weight)
    close(bn.backward(dy), edx, np.float64)
    close(bn.grad_weight, edw, np.float64)
    close(bn.grad_bias, edb, np.float64)


def test_module_without_running_stats_uses_batch_statistics_in_eval():
    C = 3
    bn = SyncBatchNorm(C, track_running_stats=False, comm=LOCAL, dtype=np.float64)
    assert bn.running_mean is None and bn.running_var is None
    r = rng(63)
    x = r.standard_normal((9, C, 4)) * 2 + 5
    dy = r.standard_normal(x.shape)
    for training in (True, False):
        close(bn.forward(x, training=training), bn_forward_ref(x), np.float64)
        close(bn.backward(dy), bn_backward_ref(dy, x)[0], np.float64)
    assert bn.running_mean is None and bn.num_batches_tracked is None


# ---- primitives ---------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("axis", [1, -1])
def test_primitives_chained_by_hand_equal_the_composed_functions(axis, dtype):
    r = rng(70)
    x = (r.standard_normal((5, 4, 6)) * 2 + 1).astype(dtype)
    dy = r.standard_normal(x.shape).astype(dtype)
    C = x.shape[axis]
    w, b = r.uniform(0.5, 1.5, C).astype(dtype), r.standard_normal(C).astype(dtype)
    rm1, rv1 = r.standard_normal(C), r.uniform(0.5, 2, C)
    rm2, rv2 = rm1.copy(), rv1.copy()

    y, ctx = syncbn.batch_norm_forward(x, w, b, rm1, rv1, momentum=0.2, axis=axis, comm=LOCAL)
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)

    buf = syncbn.batch_norm_stats(x, axis=axis)
    assert buf.dtype == np.float64 and buf.shape == (syncbn.stats_buffer_size(C),)
    assert syncbn.stats_buffer_size(C) == 2 * C + 1 + 16  # payload, count, fingerprint
    syncbn.allreduce(buf, comm=LOCAL)
    mean, invstd, var, count = syncbn.batch_norm_gather_stats(buf, rm2, rv2, momentum=0.2)
    assert count == x.size // C
    _, evar, _, _ = batch_moments(x, axis)
    np.testing.assert_allclose(var, evar, rtol=1e-12)
    y2 = syncbn.batch_norm_elemt(x, mean, invstd, w, b, axis=axis)
    sums, gw, gb = syncbn.batch_norm_backward_reduce(dy, x, mean, invstd, axis=axis)
    assert sums.shape == (syncbn.stats_buffer_size(C),)  # as long as the forward's
    syncbn.allreduce(sums, comm=LOCAL)
    dx2 = syncbn.batch_norm_backward_elemt(dy, x, mean, invstd, w, sums, count, axis=axis)

    np.testing.assert_array_equal(mean, ctx.mean)
    np.testing.assert_array_equal(invstd, ctx.invstd)
    np.testing.assert_array_equal(rm2, rm1)
    np.testing.assert_array_equal(rv2, rv1)
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(dx2, dx)
    np.testing.assert_allclose(gw, as_f64(dw), rtol=TOL[dtype][0], atol=1e-12)
    np.testing.assert_allclose(gb, as_f64(db), rtol=TOL[dtype][0], atol=1e-12)


# ---- communication ------------------------------------------------------------------


class CountingComm:
    """A world of one that records each collective's payload."""

    rank = 0
    size = 1

    def __init__(self):
        self.payloads = []

    def allreduce(self, buf):
        assert buf.dtype == np.float64 and buf.ndim == 1
        self.payloads.append(buf.size)


@pytest.mark.parametrize("n", [2, 8, 64])
def test_one_allreduce_per_forward_and_backward_with_o_of_c_payload(n):
    C = 5
    comm = CountingComm()
    x = rng(80).standard_normal((n, C, 3))
    y, ctx = syncbn.batch_norm_forward(x, np.ones(C), np.zeros(C), np.zeros(C), np.ones(C),
                                       comm=comm)
    # O(C) and independent of the world size: 2C sums, the count, the fingerprint; both
    # directions have the same length, so a forward meeting a backward is caught by the
    # fingerprint rather than by the transport.
    assert comm.payloads == [2 * C + 1 + 16]
    syncbn.batch_norm_backward(np.ones_like(y), ctx)
    assert comm.payloads == [2 * C + 1 + 16] * 2


def test_module_one_allreduce_per_training_step():
    C = 4
    comm = CountingComm()
    bn = SyncBatchNorm(C, comm=comm)
    x = rng(81).standard_normal((6, C, 2)).astype(np.float32)
    bn.backward(np.ones_like(bn.forward(x)))
    assert comm.payloads == [2 * C + 1 + 16] * 2


class MirrorComm:
    """A pretend world of two whose other rank holds the same batch: the sum doubles."""

    rank = 0
    size = 2

    def allreduce(self, buf):
        buf *= 2


def test_statistics_and_gradients_come_from_the_communicator_sum():
    # Two identical ranks: equal to plain batch norm on the batch concatenated with itself
    # (same mean and biased variance, unbiased running variance with the count 2n).
    r = rng(82)
    x = r.standard_normal((5, 3, 4)) * 2 + 1
    dy = r.standard_normal(x.shape)
    w, b = r.uniform(0.5, 1.5, 3), r.standard_normal(3)
    rm, rv = np.zeros(3), np.ones(3)
    y, ctx = syncbn.batch_norm_forward(x, w, b, rm, rv, momentum=1.0, comm=MirrorComm())
    xx, dydy = np.concatenate([x, x]), np.concatenate([dy, dy])
    assert ctx.count == 2 * 20
    close(y, bn_forward_ref(xx, w, b)[:5], np.float64)
    erm, erv = running_stats_ref(rm, rv, xx, 1, 1.0)
    np.testing.assert_allclose(rm, erm, rtol=1e-12)
    np.testing.assert_allclose(rv, erv, rtol=1e-12)
    dx, dw, db = syncbn.batch_norm_backward(dy, ctx)
    edx, edw, edb = bn_backward_ref(dydy, xx, w)
    close(dx, edx[:5], np.float64)
    # Local parameter gradients: half of the global ones.
    close(dw, edw / 2, np.float64)
    close(db, edb / 2, np.float64)


def test_eval_reads_read_only_running_stats_and_never_writes_them():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    rm = rng.standard_normal(3).astype(np.float32)
    rv = rng.uniform(0.5, 2, 3).astype(np.float32)
    rm.flags.writeable = rv.flags.writeable = False  # e.g. memory-mapped frozen statistics
    y, _ = syncbn.batch_norm_forward(x, None, None, rm, rv, training=False)
    np.testing.assert_allclose(y, bn_eval_ref(x, rm, rv), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="^running_mean: expected a writable array"):
        syncbn.batch_norm_forward(x, None, None, rm, rv, training=True)
