"""DESIGN.md, Errors: bad input gets a clear Python exception that names the argument and
what was expected, raised before any collective, and nothing is written to running stats
(or num_batches_tracked) on a failed call. Eval mode never communicates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import syncbn
import syncbn.torch as sbt
from syncbn.numpy import SyncBatchNorm

C = 3


class CountingComm:
    """A world of one that counts its collectives."""

    rank = 0
    size = 1

    def __init__(self):
        self.calls = 0
        self.payloads = []

    def allreduce(self, buf):
        self.calls += 1
        self.payloads.append(buf.size)


class State:
    """Arguments of one forward call, with bitwise copies of the running stats."""

    def __init__(self, x=None, dtype=np.float64):
        rng = np.random.default_rng(0)
        self.x = rng.standard_normal((8, C, 4)).astype(dtype) if x is None else x
        self.weight = rng.standard_normal(C).astype(dtype)
        self.bias = rng.standard_normal(C).astype(dtype)
        self.running_mean = rng.standard_normal(C).astype(dtype)
        self.running_var = rng.uniform(0.5, 2.0, C).astype(dtype)
        self.rm0 = self.running_mean.copy()
        self.rv0 = self.running_var.copy()
        self.comm = CountingComm()

    def kwargs(self, **over):
        kw = dict(x=self.x, weight=self.weight, bias=self.bias,
                  running_mean=self.running_mean, running_var=self.running_var,
                  comm=self.comm)
        kw.update(over)
        return kw

    def assert_untouched(self):
        assert self.running_mean.tobytes() == self.rm0.tobytes()
        assert self.running_var.tobytes() == self.rv0.tobytes()


def forward_fails(exc, match, **over):
    """Calls batch_norm_forward with `over` replacing the defaults; checks the exception,
    that no collective ran and that the running stats are bitwise untouched."""
    s = State()
    kw = s.kwargs(**over)
    x = kw.pop("x")
    with pytest.raises(exc, match=match):
        syncbn.batch_norm_forward(x, **kw)
    assert s.comm.calls == 0
    s.assert_untouched()


# ---- x ------------------------------------------------------------------------------


def test_x_of_rank_1_is_a_value_error_naming_x():
    forward_fails(ValueError, r"^x: expected at least 2 dimensions.*\(6,\)", x=np.zeros(6))


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
def test_integer_x_is_a_type_error_naming_x_and_the_floating_dtypes(dtype):
    forward_fails(TypeError, r"^x: expected a floating dtype.*int",
                  x=np.ones((8, C, 4), dtype=dtype))


def test_complex_x_is_a_type_error_naming_x():
    forward_fails(TypeError, r"^x: expected a floating dtype.*complex",
                  x=np.ones((8, C, 4), dtype=np.complex128))


def test_bool_x_is_a_type_error_naming_x():
    forward_fails(TypeError, r"^x: expected a floating dtype.*bool",
                  x=np.ones((8, C, 4), dtype=bool))


@pytest.mark.parametrize("x", [[[1.0, 2.0, 3.0]] * 4, None, "x"], ids=["list", "None", "str"])
def test_non_array_x_is_a_type_error_naming_x(x):
    forward_fails(TypeError, r"^x: expected .*array", x=x)


def test_integer_torch_x_is_a_type_error_naming_x():
    forward_fails(TypeError, r"^x: expected a floating dtype",
                  x=torch.ones((8, C, 4), dtype=torch.int64))


# ---- axis ---------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [3, 7, -4, -10])
def test_axis_out_of_range_is_a_value_error_naming_axis_and_the_range(axis):
    forward_fails(ValueError, rf"^axis: expected an integer in \[-3, 3\).*got {axis}$",
                  axis=axis)


@pytest.mark.parametrize("axis", [1.0, "1", None, True], ids=["float", "str", "None", "bool"])
def test_non_int_axis_is_a_type_error_naming_axis(axis):
    forward_fails(TypeError, r"^axis: expected an int", axis=axis)


def test_non_int_axis_in_primitives_is_a_type_error_naming_axis():
    x = np.ones((4, C))
    with pytest.raises(TypeError, match=r"^axis: expected an int"):
        syncbn.batch_norm_stats(x, axis=1.5)
    with pytest.raises(ValueError, match=r"^axis: expected an integer in \[-2, 2\)"):
        syncbn.batch_norm_stats(x, axis=2)


# ---- per-channel vectors ------------------------------------------------------------


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
@pytest.mark.parametrize("shape", [(C + 1,), (C - 1,), (C, 1), ()], ids=str)
def test_channel_count_mismatch_is_a_value_error_naming_the_argument(name, shape):
    forward_fails(ValueError, rf"^{name}: expected shape \({C},\) \(the channel count of x\)",
                  **{name: np.ones(shape)})


@pytest.mark.parametrize("name", ["weight", "bias", "running_mean", "running_var"])
def test_integer_per_channel_vector_is_a_type_error_naming_the_argument(name):
    forward_fails(TypeError, rf"^{name}: expected a floating dtype", **{name: np.ones(C, int)})


@pytest.mark.parametrize("name", ["running_mean", "running_var"])
def test_read_only_running_stat_is_a_value_error_naming_it(name):
    s = State()
    ro = getattr(s, name)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{name}: expected a writable array"):
        syncbn.batch_norm_forward(**s.kwargs())
    assert s.comm.calls == 0
    s.assert_untouched()


def test_running_mean_without_running_var_is_a_value_error_naming_running_var():
    forward_fails(ValueError, r"^running_var: expected an array when running_mean is given",
                  running_var=None)


def test_running_var_without_running_mean_is_a_value_error_naming_running_mean():
    forward_fails(ValueError, r"^running_mean: expected an array when running_var is given",
                  running_mean=None)


def test_eval_without_running_stats_is_a_value_error_naming_running_mean():
    forward_fails(ValueError, r"^running_mean: expected running statistics when training=False",
                  running_mean=None, running_var=None, training=False)


# ---- scalars ------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [-0.1, 1.5, float("nan"), float("inf")])
def test_momentum_outside_0_1_is_a_value_error_naming_momentum(momentum):
    forward_fails(ValueError, r"^momentum: expected a finite number in \[0, 1\]",
                  momentum=momentum)


def test_non_number_momentum_is_a_type_error_naming_momentum():
    forward_fails(TypeError, r"^momentum: expected a float", momentum="0.1")


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), float("inf")])
def test_negative_or_non_finite_eps_is_a_value_error_naming_eps(eps):
    forward_fails(ValueError, r"^eps: expected a finite number >= 0", eps=eps)


# ---- communicator -------------------------------------------------------------------


class NoAllreduce:
    rank = 0
    size = 1


class NoRank:
    size = 1

    def allreduce(self, buf):
        raise AssertionError("must not be called")


class FloatSize:
    rank = 0
    size = 1.0

    def allreduce(self, buf):
        raise AssertionError("must not be called")


class RankOutOfRange:
    rank = 1
    size = 1

    def allreduce(self, buf):
        raise AssertionError("must not be called")


@pytest.mark.parametrize("comm, what", [
    (NoAllreduce(), "without allreduce"),
    (NoRank(), "without rank"),
    (FloatSize(), "integer `size`, got float"),
    (object(), "without rank, size, allreduce"),
    ("comm", "without rank"),
], ids=["no-allreduce", "no-rank", "float-size", "object", "str"])
def test_bad_communicator_object_is_a_type_error_naming_comm(comm, what):
    forward_fails(TypeError, rf"^comm: expected .*{what}", comm=comm)


def test_communicator_rank_not_below_size_is_a_value_error_naming_comm():
    forward_fails(ValueError, r"^comm: expected 0 <= rank < size", comm=RankOutOfRange())


def test_bad_communicator_in_allreduce_primitive_is_a_type_error_naming_comm():
    with pytest.raises(TypeError, match=r"^comm: expected"):
        syncbn.allreduce(np.zeros(2 * C + 1), comm=NoAllreduce())


# ---- backward -----------------------------------------------------------------------


def _forward_for_backward():
    s = State()
    y, ctx = syncbn.batch_norm_forward(**s.kwargs())
    assert s.comm.calls == 1
    return s, y, ctx


@pytest.mark.parametrize("shape", [(8, C, 5), (8, C), (8, C + 1, 4), (4, 8, C)], ids=str)
def test_dy_of_wrong_shape_is_a_value_error_naming_dy_and_the_shape_of_x(shape):
    s, _, ctx = _forward_for_backward()
    with pytest.raises(ValueError, match=r"^dy: expected shape \(8, 3, 4\) \(the shape of x\)"):
        syncbn.batch_norm_backward(np.ones(shape), ctx)
    assert s.comm.calls == 1


@pytest.mark.parametrize("dtype, match", [
    (np.float32, r"^dy: expected dtype float64 \(the dtype of x\), got float32"),
    (np.float16, r"^dy: expected dtype float64 \(the dtype of x\), got float16"),
    (np.int64, r"^dy: expected a floating dtype"),
    (np.complex128, r"^dy: expected a floating dtype"),
], ids=["float32", "float16", "int64", "complex128"])
def test_dy_of_wrong_dtype_is_a_type_error_naming_dy(dtype, match):
    s, y, ctx = _forward_for_backward()
    with pytest.raises(TypeError, match=match):
        syncbn.batch_norm_backward(np.ones(y.shape, dtype=dtype), ctx)
    assert s.comm.calls == 1


@pytest.mark.parametrize("dy", [None, [[1.0]]], ids=["None", "list"])
def test_non_array_dy_is_a_type_error_naming_dy(dy):
    s, _, ctx = _forward_for_backward()
    with pytest.raises(TypeError, match=r"^dy: expected an array"):
        syncbn.batch_norm_backward(dy, ctx)
    assert s.comm.calls == 1


def _primitive_args():
    x = np.random.default_rng(6).standard_normal((8, C))
    buf = syncbn.allreduce(syncbn.batch_norm_stats(x))
    mean, invstd, _, n = syncbn.batch_norm_gather_stats(buf)
    return dict(x=x, mean=mean, invstd=invstd, n=n, sums=np.zeros(2 * C))


@pytest.mark.parametrize("name, call", [
    ("x", lambda a: syncbn.batch_norm_stats(None)),
    ("buffer", lambda a: syncbn.allreduce(None)),
    ("buffer", lambda a: syncbn.batch_norm_gather_stats(None)),
    ("mean", lambda a: syncbn.batch_norm_elemt(a["x"], None, a["invstd"])),
    ("dy", lambda a: syncbn.batch_norm_backward_reduce(None, a["x"], a["mean"], a["invstd"])),
    ("dy", lambda a: syncbn.batch_norm_backward_elemt(None, a["x"], a["mean"], a["invstd"],
                                                      None, a["sums"], a["n"])),
], ids=["stats-x", "allreduce-buffer", "gather_stats-buffer", "elemt-mean",
        "backward_reduce-dy", "backward_elemt-dy"])
def test_none_for_a_required_array_in_primitives_is_a_type_error_naming_it(name, call):
    args = _primitive_args()
    with pytest.raises(TypeError, match=rf"^{name}: expected an array"):
        call(args)


# ---- module -------------------------------------------------------------------------


def _module(**kw):
    comm = CountingComm()
    bn = SyncBatchNorm(C, comm=comm, **kw)
    rng = np.random.default_rng(1)
    bn.running_mean[:] = rng.standard_normal(C)
    bn.running_var[:] = rng.uniform(0.5, 2.0, C)
    bn.num_batches_tracked[...] = 5
    snap = (bn.running_mean.tobytes(), bn.running_var.tobytes(),
            bn.num_batches_tracked.tobytes())
    return bn, comm, snap


def _module_untouched(bn, snap):
    assert (bn.running_mean.tobytes(), bn.running_var.tobytes(),
            bn.num_batches_tracked.tobytes()) == snap


@pytest.mark.parametrize("x, exc, match", [
    (np.ones((8, C + 1, 4), np.float32), ValueError,
     r"^x: expected 3 channels \(num_features\) along axis 1, got shape \(8, 4, 4\)"),
    (np.ones(8, np.float32), ValueError, r"^x: expected at least 2 dimensions"),
    (np.ones((8, C), np.int32), TypeError, r"^x: expected a floating dtype"),
    ([[1.0] * C] * 4, TypeError, r"^x: expected .*array"),
], ids=["channels", "rank-1", "int32", "list"])
def test_module_bad_input_raises_before_any_collective_and_keeps_its_buffers(x, exc, match):
    bn, comm, snap = _module()
    with pytest.raises(exc, match=match):
        bn.forward(x)
    assert comm.calls == 0
    _module_untouched(bn, snap)


def test_module_channel_mismatch_without_affine_names_x_and_num_features():
    bn, comm, snap = _module(affine=False)
    with pytest.raises(ValueError, match=r"^x: expected 3 channels \(num_features\) along "
                                         r"axis 1, got shape \(8, 4\)"):
        bn.forward(np.ones((8, C + 1), np.float32))
    assert comm.calls == 0
    _module_untouched(bn, snap)


def test_module_backward_before_forward_is_a_runtime_error():
    bn, _, _ = _module()
    with pytest.raises(RuntimeError, match=r"^backward: expected a successful forward first"):
        bn.backward(np.ones((8, C), np.float32))


def test_module_backward_with_bad_dy_raises_before_any_collective():
    bn, comm, _ = _module()
    bn.forward(np.random.default_rng(2).standard_normal((8, C)).astype(np.float32))
    assert comm.calls == 1
    with pytest.raises(ValueError, match=r"^dy: expected shape \(8, 3\)"):
        bn.backward(np.ones((8, C + 1), np.float32))
    with pytest.raises(TypeError, match=r"^dy: expected dtype float32"):
        bn.backward(np.ones((8, C), np.float64))
    assert comm.calls == 1


@pytest.mark.parametrize("kw, match", [
    (dict(num_features=0), r"^num_features: expected a positive int"),
    (dict(num_features=2.0), r"^num_features: expected a positive int"),
    (dict(num_features=C, momentum=1.5), r"^momentum: expected a float in \[0, 1\] or None"),
], ids=["zero-features", "float-features", "momentum"])
def test_module_bad_constructor_argument_names_it(kw, match):
    with pytest.raises(ValueError, match=match):
        SyncBatchNorm(**kw)


# ---- eval never communicates --------------------------------------------------------


def test_eval_mode_never_calls_the_communicator():
    s = State()
    y, ctx = syncbn.batch_norm_forward(**s.kwargs(training=False))
    dx, dw, db = syncbn.batch_norm_backward(np.ones_like(y), ctx)
    assert s.comm.calls == 0
    s.assert_untouched()
    assert dx.shape == s.x.shape and dw.shape == db.shape == (C,)


def test_module_eval_never_communicates():
    bn, comm, snap = _module()
    x = np.random.default_rng(3).standard_normal((8, C, 4)).astype(np.float32)
    y = bn.forward(x, training=False)
    bn.backward(np.ones_like(y))
    assert comm.calls == 0
    _module_untouched(bn, snap)


def test_module_eval_without_running_stats_never_communicates():
    bn = SyncBatchNorm(C, track_running_stats=False, comm=CountingComm())
    comm = bn._comm_arg
    x = np.random.default_rng(4).standard_normal((8, C)).astype(np.float32)
    y = bn.forward(x, training=False)
    bn.backward(np.ones_like(y))
    assert comm.calls == 0


# ---- degenerate batches -------------------------------------------------------------


def test_global_count_of_one_per_channel_is_a_value_error_and_keeps_running_stats():
    s = State(x=np.random.default_rng(5).standard_normal((1, C)))
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per channel"):
        syncbn.batch_norm_forward(**s.kwargs())
    s.assert_untouched()


def test_module_global_count_of_one_is_a_value_error_and_keeps_its_buffers():
    bn, _, snap = _module()
    with pytest.raises(ValueError, match=r"^x: expected more than 1 value per channel"):
        bn.forward(np.ones((1, C, 1, 1), np.float32))
    _module_untouched(bn, snap)


def test_zero_size_batch_returns_empty_y_and_keeps_running_stats():
    s = State(x=np.empty((0, C, 4)))
    y, ctx = syncbn.batch_norm_forward(**s.kwargs())
    assert isinstance(y, np.ndarray) and y.shape == (0, C, 4) and y.dtype == np.float64
    assert ctx.count == 0
    s.assert_untouched()
    dx, dw, db = syncbn.batch_norm_backward(np.empty((0, C, 4)), ctx)
    assert dx.shape == (0, C, 4)
    np.testing.assert_array_equal(dw, 0)
    np.testing.assert_array_equal(db, 0)


def test_module_zero_size_batch_keeps_its_buffers():
    bn, _, snap = _module()
    y = bn.forward(np.empty((0, C, 4), np.float32))
    assert y.shape == (0, C, 4)
    _module_untouched(bn, snap)


# ---- torch inputs -------------------------------------------------------------------


def test_torch_cpu_tensor_input_returns_a_torch_tensor():
    s = State()
    xt = torch.from_numpy(s.x.copy())
    rm, rv = torch.from_numpy(s.rm0.copy()), torch.from_numpy(s.rv0.copy())
    y, ctx = syncbn.batch_norm_forward(xt, torch.from_numpy(s.weight), torch.from_numpy(s.bias),
                                       rm, rv, comm=s.comm)
    assert isinstance(y, torch.Tensor) and y.dtype == torch.float64 and y.shape == xt.shape
    y_np, _ = syncbn.batch_norm_forward(**s.kwargs())
    np.testing.assert_array_equal(y.numpy(), y_np)
    np.testing.assert_array_equal(rm.numpy(), s.running_mean)
    dx, dw, db = syncbn.batch_norm_backward(torch.ones_like(y), ctx)
    assert all(isinstance(t, torch.Tensor) for t in (dx, dw, db))


def test_torch_tensor_with_requires_grad_works():
    s = State()
    xt = torch.from_numpy(s.x.copy()).requires_grad_()
    wt = torch.from_numpy(s.weight.copy()).requires_grad_()
    bt = torch.from_numpy(s.bias.copy()).requires_grad_()
    y, ctx = syncbn.batch_norm_forward(xt, wt, bt, comm=s.comm)
    assert isinstance(y, torch.Tensor) and y.shape == xt.shape
    y_ref, _ = syncbn.batch_norm_forward(s.x, s.weight, s.bias, comm=s.comm)
    np.testing.assert_array_equal(y.detach().numpy(), y_ref)
    dx, dw, db = syncbn.batch_norm_backward(torch.ones_like(y), ctx)
    assert isinstance(dx, torch.Tensor) and dx.shape == xt.shape
    assert dw.shape == db.shape == (C,)


# ---- clear messages instead of library internals -------------------------------------


def test_torch_meta_and_sparse_tensors_are_named():
    s = State()
    meta = torch.empty(8, C, 4, device="meta")
    with pytest.raises(TypeError, match="^x: expected a strided tensor with data .* got a "
                                        "meta tensor"):
        syncbn.batch_norm_forward(meta, comm=s.comm)
    sparse = torch.from_numpy(s.x).to_sparse()
    with pytest.raises(TypeError, match="^x: expected a strided tensor .* layout "
                                        "torch.sparse_coo; call .to_dense"):
        syncbn.batch_norm_forward(sparse, comm=s.comm)
    with pytest.raises(TypeError, match="^weight: expected a strided tensor"):
        syncbn.batch_norm_forward(torch.from_numpy(s.x), torch.ones(C).to_sparse(),
                                  comm=s.comm)
    assert s.comm.calls == 0


def test_big_endian_numpy_array_is_named():
    s = State()
    forward_fails(TypeError, r"^x: expected an array in native byte order, got >f8 "
                             r"\(big-endian\)", x=s.x.astype(">f8"))
    forward_fails(TypeError, r"^running_var: expected an array in native byte order",
                  running_var=s.running_var.astype(">f8"))


@pytest.mark.parametrize("axis", [2**40, -(2**40), 2**31])
def test_axis_beyond_any_array_is_a_value_error(axis):
    forward_fails(ValueError, rf"^axis: expected an integer in \[-3, 3\) for x of 3 "
                              rf"dimensions, got {axis}$", axis=axis)
    with pytest.raises(ValueError, match="^axis: expected an integer"):
        syncbn.batch_norm_stats(State().x, axis=axis)


def test_communicator_whose_size_does_not_fit_an_int_is_named():
    class Huge:
        rank, size = 0, 2**40

        def allreduce(self, buf):
            pass

    with pytest.raises(ValueError, match=r"^comm: expected 0 <= rank < size <= 2\*\*31 - 1, "
                                         r"got rank=0, size=1099511627776"):
        syncbn.comm.as_communicator(Huge())
    forward_fails(ValueError, "^comm: expected 0 <= rank < size", comm=Huge())


@pytest.mark.parametrize("momentum", [np.array([0.1, 0.2]), np.array([[0.1]]),
                                      torch.tensor([0.1, 0.2])])
def test_momentum_array_is_a_type_error(momentum):
    forward_fails(TypeError, r"^momentum: expected a float, got \w+ of shape", momentum=momentum)


def test_momentum_zero_d_array_is_a_float():
    s = State()
    syncbn.batch_norm_forward(**s.kwargs(momentum=np.float32(0.5)))
    syncbn.batch_norm_forward(**s.kwargs(momentum=np.array(0.5)))
    assert s.comm.calls == 2


@pytest.mark.parametrize("kw, exc, match", [
    (dict(momentum="abc"), TypeError, "^momentum: expected a float, got str"),
    (dict(axis="a"), TypeError, "^axis: expected an int, got str"),
    (dict(eps="x"), TypeError, "^eps: expected a float, got str"),
    (dict(eps=0.0), ValueError, r"^eps: expected a finite float > 0, got 0.0"),
    (dict(eps=float("inf")), ValueError, r"^eps: expected a finite float > 0, got inf"),
])
def test_numpy_module_constructor_names_bad_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        SyncBatchNorm(C, **kw)


def test_numpy_module_failed_forward_clears_the_context_for_backward():
    bn, _, _ = _module()
    x = np.random.default_rng(2).standard_normal((4, C, 2)).astype(np.float32)
    y = bn.forward(x)
    bn.backward(np.ones_like(y))  # a successful pair
    with pytest.raises(ValueError):
        bn.forward(np.ones((4, C + 1, 2), np.float32))  # wrong channel count
    with pytest.raises(RuntimeError, match="^backward: expected a successful forward first"):
        bn.backward(np.ones_like(y))


# ---- NaN / inf parity with torch.nn.BatchNorm ------------------------------------------


def test_eval_input_gradient_of_finite_elements_stays_finite_beside_inf_and_nan():
    x = torch.randn(6, C, 4, dtype=torch.float64)
    x[0, 1, 0], x[2, 2, 3] = float("inf"), float("nan")
    ref = torch.nn.BatchNorm1d(C).double().eval()
    ours = sbt.SyncBatchNorm(C).double().eval()
    with torch.no_grad():
        for m in (ref, ours):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.uniform_(0.5, 1.5)
        ours.load_state_dict(ref.state_dict())
    dy = torch.randn_like(x)
    g_ref = torch.autograd.grad(ref(x.requires_grad_()), x, dy)[0]
    g_ours = torch.autograd.grad(ours(x), x, dy)[0]
    torch.testing.assert_close(g_ours, g_ref)  # dx = dy * invstd * w: x not read
    assert torch.isfinite(g_ours).all()


def test_a_channel_of_plus_inf_gives_running_mean_inf_like_torch():
    x = torch.randn(6, C, 4, dtype=torch.float64)
    x[:, 1] = float("inf")
    ref = torch.nn.BatchNorm1d(C).double()
    ours = sbt.SyncBatchNorm(C).double()
    y_ref, y_ours = ref(x), ours(x)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, equal_nan=True)
    assert ours.running_mean[1] == float("inf")
    torch.testing.assert_close(ours.running_var, ref.running_var, equal_nan=True)
    torch.testing.assert_close(y_ours, y_ref, equal_nan=True)


# ---- masks (the core's ForwardOptions::mask, through the bindings) ------------------------


def _masked_forward(mask, counts=None, x=None):
    from syncbn import _core

    x = np.random.default_rng(0).standard_normal((4, 3, 2)) if x is None else x
    C = x.shape[1]
    rm, rv = np.zeros(C), np.ones(C)
    y, sm, si = np.empty_like(x), np.empty(C), np.empty(C)
    n = _core.forward(x, None, None, rm, rv, y, sm, si, True, 0.1, 1e-5, 1,
                      syncbn.comm.local(), mask=mask, counts=counts)
    return n, y, rm, rv


def test_mask_of_the_wrong_shape_is_a_value_error_naming_mask_before_anything_is_written():
    x = np.random.default_rng(0).standard_normal((4, 3, 2))
    for bad in (np.ones((4, 2)), np.ones((4, 2, 2)), np.ones((3, 1, 2))):
        with pytest.raises(ValueError, match=r"^mask: expected shape \(4, 3, 2\) \(the shape of "
                                             r"x\) or \(4, 1, 2\)"):
            _masked_forward(bad, x=x)


def test_mask_with_the_channel_axis_needs_counts():
    with pytest.raises(ValueError, match=r"^counts: expected a float64 \(3,\) array"):
        _masked_forward(np.ones((4, 3, 2)))


def test_masks_count_positions_or_per_channel_elements():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3, 2))
    m = (rng.random((4, 1, 2)) > 0.3).astype(np.float64)
    m[:2] = 1
    n, y, rm, rv = _masked_forward(m, x=x)
    mb = np.broadcast_to(m, x.shape) > 0
    sel = np.where(mb, x, np.nan)
    mean, var = np.nanmean(sel, axis=(0, 2)), np.nanvar(sel, axis=(0, 2))
    assert n == mb[:, 0].sum()
    np.testing.assert_allclose(y, (x - mean[:, None]) / np.sqrt(var[:, None] + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(rv, 0.9 + 0.1 * var * n / (n - 1), rtol=1e-12)  # torch's rule
    full = (rng.random(x.shape) > 0.4).astype(np.float32)
    full[:, 2] = 0  # channel 2 counts nothing: mean 0, variance 0, running stats left
    full[:2, :2] = 1
    counts = np.empty(3)
    n, y, rm, rv = _masked_forward(full, counts, x=x)
    np.testing.assert_array_equal(counts, full.sum(axis=(0, 2)))
    assert n == counts.sum()
    np.testing.assert_allclose(y[:, 2], x[:, 2] / np.sqrt(1e-5), rtol=1e-12)
    assert rm[2] == 0 and rv[2] == 1
    sel = np.where(full > 0, x, np.nan)
    np.testing.assert_allclose(rm[:2], 0.1 * np.nanmean(sel[:, :2], axis=(0, 2)), rtol=1e-12)
