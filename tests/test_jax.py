"""syncbn.jax, syncbn.flax and Keras on JAX (DESIGN.md: "Compiled graphs"; "Collectives:
order, fingerprint, validation").

Single-process tests run here; the multi-rank ones share two real `mpiexec` jobs
(tests/workers/jax_worker.py: -n 3 with an empty rank, -n 2 uneven), whose ranks write
what they got and rank 0 the reference (flax's / keras' BatchNorm trained in one process
on the concatenated batch); the tests compare.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import NamedTuple

import numpy as np
import pytest

import syncbn

from conftest import ROOT, WORKERS, run_mpi

if not syncbn.build_info()["jax"]:
    if os.environ.get("CI"):  # CI builds them (.ci/run): a skip there would hide a failure
        raise RuntimeError("CI: syncbn was built without its XLA FFI handlers")
    pytest.skip("syncbn was built without its XLA FFI handlers (SYNCBN_WITH_JAX=ON "
                "pip install ...)", allow_module_level=True)
jax = pytest.importorskip("jax")
flax = pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import syncbn.flax as sbf  # noqa: E402
import syncbn.jax as sbj  # noqa: E402

MPI_ENV = {"SYNCBN_COLLECTIVE_TIMEOUT": "120",  # bounds a hang; waiting ranks sleep
           "KERAS_BACKEND": "jax"}  # tests/test_keras.py sets torch in this process
pytestmark = pytest.mark.timeout(600)  # JAX start-up and compiles on 2 busy cores


def f32(a):
    return np.asarray(a, np.float32)


# ---- one process ------------------------------------------------------------------------


def flax_reference(x, scale, bias, stats, axis, momentum, eps=1e-5):
    C = x.shape[axis]
    bn = nnx.BatchNorm(C, axis=axis, momentum=momentum, epsilon=eps, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = scale, bias
    bn.mean[...], bn.var[...] = stats
    return bn


@pytest.mark.parametrize("shape,axis", [((6, 5, 3), -1), ((4, 3, 2, 5), 1), ((7, 4), 1),
                                        ((3, 2, 4, 2, 3), 2)])
def test_world_of_one_equals_flax_batchnorm_under_jit_and_grad(shape, axis):
    rng = np.random.default_rng(0)
    C = shape[axis]
    x = jnp.asarray(rng.standard_normal(shape) * 3 + 2, jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    scale = jnp.asarray(rng.uniform(0.5, 2, C), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(C), jnp.float32)
    stats = (jnp.asarray(rng.standard_normal(C), jnp.float32), jnp.ones(C, jnp.float32))

    def ours(x, scale, bias):
        y, new = sbj.batch_norm(x, scale, bias, stats, momentum=0.9, axis=axis)
        return (y * g).sum(), (y, new)

    (_, (y, (mean, var))), grads = jax.jit(
        jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True))(x, scale, bias)
    bn = flax_reference(x, scale, bias, stats, axis, 0.9)

    def ref(bn, x):
        y = bn(x)
        return (y * g).sum(), y

    (_, y_ref), (gbn, dx_ref) = nnx.value_and_grad(ref, argnums=(0, 1), has_aux=True)(bn, x)
    np.testing.assert_allclose(f32(y), f32(y_ref), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f32(grads[0]), f32(dx_ref), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(f32(grads[1]), f32(gbn["scale"][...]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f32(grads[2]), f32(gbn["bias"][...]), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(f32(mean), f32(bn.mean[...]), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f32(var), f32(bn.var[...]), rtol=1e-5, atol=1e-6)
    # eval: the running statistics, the same as flax in eval
    y_eval, new = jax.jit(lambda x: sbj.batch_norm(x, scale, bias, stats, training=False,
                                                   axis=axis))(x)
    bn = flax_reference(x, scale, bias, stats, axis, 0.9)
    bn.eval()
    np.testing.assert_allclose(f32(y_eval), f32(bn(x)), rtol=1e-5, atol=1e-5)
    assert new[0] is not None and np.array_equal(new[0], stats[0])


@pytest.mark.parametrize("dtype,tol", [("float16", 2e-3), ("bfloat16", 1.6e-2)])
def test_half_inputs_accumulate_wider_than_their_dtype(dtype, tol):
    rng = np.random.default_rng(3)
    x64 = rng.standard_normal((64, 5, 4)) * 0.5 + 20.0  # a mean 40x the deviation
    x = jnp.asarray(x64, dtype)
    xr = np.asarray(x.astype(jnp.float32), np.float64)  # what the kernel sees
    y, (mean, var) = jax.jit(lambda x: sbj.batch_norm(x, None, None, (jnp.zeros(5),
                                                                     jnp.ones(5)), axis=1))(x)
    assert y.dtype == x.dtype and mean.dtype == jnp.float32
    m, v = xr.mean((0, 2)), xr.var((0, 2))
    ref = (xr - m[:, None]) / np.sqrt(v[:, None] + 1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, atol=tol * 4, rtol=tol)
    np.testing.assert_allclose(f32(mean), 0.01 * m, rtol=1e-5)
    np.testing.assert_allclose(f32(var), 0.99 + 0.01 * v, rtol=1e-5)


def test_torch_convention_weighs_the_batch_and_uses_the_unbiased_variance():
    x = jnp.asarray(np.arange(12.0).reshape(6, 2), jnp.float32)
    stats = (jnp.zeros(2), jnp.ones(2))
    _, (mean, var) = sbj.batch_norm(x, None, None, stats, momentum=0.25, axis=1,
                                    convention="torch")
    np.testing.assert_allclose(f32(mean), 0.25 * np.arange(12.0).reshape(6, 2).mean(0))
    np.testing.assert_allclose(f32(var), 0.75 + 0.25 * np.var(np.arange(12.0).reshape(6, 2),
                                                                axis=0, ddof=1), rtol=1e-6)
    _, (mean, var) = sbj.batch_norm(x, None, None, stats, momentum=0.25, axis=1)  # flax's
    np.testing.assert_allclose(f32(mean), 0.75 * np.arange(12.0).reshape(6, 2).mean(0))
    np.testing.assert_allclose(f32(var), 0.25 + 0.75 * np.var(np.arange(12.0).reshape(6, 2),
                                                                axis=0), rtol=1e-6)


class CountingComm:
    """A world of one that counts the all-reduces it is asked for."""
    rank, size = 0, 1

    def __init__(self):
        self.calls = 0

    def allreduce(self, buf):
        self.calls += 1


def test_one_collective_each_way_in_training_none_in_eval():
    comm = CountingComm()
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 3)), jnp.float32)
    stats = (jnp.zeros(3), jnp.ones(3))

    def loss(x, training):
        return (sbj.batch_norm(x, None, None, stats, training=training, comm=comm)[0] ** 3).sum()

    jax.block_until_ready(jax.jit(jax.grad(loss), static_argnums=1)(x, True))
    assert comm.calls == 2  # forward statistics, backward sums
    jax.block_until_ready(jax.jit(jax.grad(loss), static_argnums=1)(x, False))
    jax.block_until_ready(sbj.batch_norm(x, None, None, stats, training=False, comm=comm))
    assert comm.calls == 2  # eval never communicates


def collective_chain(f, *args):
    """(target, token operand's producer) for every syncbn custom call in f's StableHLO,
    following adds (the backward adds its token cotangent to the current token)."""
    text = jax.jit(f).lower(*args).as_text()
    defs, calls = {}, []
    for line in text.splitlines():
        m = re.match(r"\s*(%[\w#]+)(?::\d+)? = (.*)", line)
        if not m:
            continue
        name, rhs = m.groups()
        defs[name] = rhs
        c = re.search(r"custom_call @(syncbn_\w+)\(([^)]*)\)", rhs)
        if c:
            ops = [o.strip() for o in c.group(2).split(",")]
            calls.append((name, c.group(1), ops))  # the token is the last operand

    def sources(v, seen=None):
        """The syncbn calls whose outputs v depends on."""
        seen = set() if seen is None else seen
        base = v.split("#")[0]
        if base in seen:
            return set()
        seen.add(base)
        if any(base == n for n, _, _ in calls):
            return {base}
        rhs = defs.get(base, "")
        out = set()
        for operand in re.findall(r"%[\w#]+", rhs):
            out |= sources(operand, seen)
        return out

    def all_sources(ops):
        return set().union(*(sources(o) for o in ops))

    return [(n, t, sources(ops[-1]), all_sources(ops)) for n, t, ops in calls]


def two_branch_loss(p, x):
    st = (jnp.zeros(4), jnp.ones(4))
    a = jnp.tanh(sbj.batch_norm(x, p[0], p[1], st, layer=1)[0])
    a = sbj.batch_norm(a, p[0], p[1], st, layer=2)[0]
    b = jnp.sin(sbj.batch_norm(x * 2, p[0], p[1], st, layer=3)[0])
    b = sbj.batch_norm(b, p[0], p[1], st, layer=4)[0]
    return (a * b).sum()


def test_ordering_token_chains_every_collective_of_a_traced_step():
    p, x = (jnp.ones(4), jnp.zeros(4)), jnp.ones((3, 4))
    chain = collective_chain(jax.value_and_grad(two_branch_loss), p, x)
    kinds = [t for _, t, _, _ in chain]
    assert kinds == ["syncbn_forward"] * 4 + ["syncbn_backward"] * 4, kinds
    # Each call depends on the call before it: the independent branches are serialized,
    # forwards in call order, then backwards in reverse. The token carries it, except into
    # the first backward, which the last forward's saved statistics order instead.
    assert chain[0][2] == set()
    for i in range(1, len(chain)):
        prev, (_, _, token_src, all_src) = chain[i - 1][0], chain[i]
        assert prev in all_src if i == 4 else token_src == {prev}, (i, chain)


def test_backward_depends_on_its_own_forward_saved_statistics():
    p, x = (jnp.ones(4), jnp.zeros(4)), jnp.ones((3, 4))
    text = jax.jit(jax.grad(two_branch_loss)).lower(p, x).as_text()
    fwd = re.findall(r"(%\w+):5 = .*custom_call @syncbn_forward", text)
    bwd = re.findall(r"custom_call @syncbn_backward\(([^)]*)\)", text)
    saved = [ops.split(",")[4].strip() for ops in bwd]  # (dy, x, scale, mask, saved, token)
    assert sorted(s.split("#")[0] for s in saved) == sorted(fwd)
    assert all(s.endswith("#3") for s in saved)


def test_saved_statistics_need_no_x64():
    assert not jax.config.jax_enable_x64
    text = jax.jit(jax.grad(two_branch_loss)).lower((jnp.ones(4), jnp.zeros(4)),
                                                    jnp.ones((3, 4))).as_text()
    # float64 results would silently become float32 without x64 (attributes are fine)
    assert not re.search(r"tensor<[^>]*f64>", text)
    assert "tensor<18xui32>" in text  # [mean | invstd | count] float64 as uint32 pairs


def test_empty_batch_returns_empty_and_leaves_statistics():
    stats = (jnp.full(3, 0.5), jnp.full(3, 2.0))
    x = jnp.zeros((0, 3), jnp.float32)

    def f(x):
        y, new = sbj.batch_norm(x, jnp.ones(3), jnp.zeros(3), stats)
        return y, new, jax.grad(lambda x: sbj.batch_norm(x, None, None, stats)[0].sum())(x)

    y, (mean, var), dx = jax.jit(f)(x)
    assert y.shape == (0, 3) and dx.shape == (0, 3)
    np.testing.assert_array_equal(mean, stats[0])
    np.testing.assert_array_equal(var, stats[1])


def test_errors_name_the_argument():
    x = jnp.ones((4, 3))
    with pytest.raises(ValueError, match="axis"):
        sbj.batch_norm(x, axis=2)
    with pytest.raises(ValueError, match=r"scale: expected shape \(3,\)"):
        sbj.batch_norm(x, jnp.ones(4))
    with pytest.raises(TypeError, match="x: expected float16"):
        sbj.batch_norm(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sbj.batch_norm(jnp.ones(3))
    with pytest.raises(ValueError, match="stats: expected"):
        sbj.batch_norm(x, training=False)
    with pytest.raises(ValueError, match="convention"):
        sbj.batch_norm(x, convention="tf")
    with pytest.raises(ValueError, match="momentum"):
        sbj.batch_norm(x, momentum=1.5)
    with pytest.raises(NotImplementedError, match="vmap"):
        jax.vmap(lambda x: sbj.batch_norm(x)[0])(jnp.ones((2, 4, 3)))
    with pytest.raises(Exception, match="ValueError: x: expected more than 1 value per "
                                        "channel"):  # a global batch of one: every rank
        jax.block_until_ready(sbj.batch_norm(jnp.ones((1, 3)))[0])


def test_flax_nnx_batchnorm_has_flax_state_and_checkpoints_load_both_ways():
    ours = sbf.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    ref = nnx.BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.BatchNorm)
    s_ours, s_ref = nnx.state(ours), nnx.state(ref)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_ref)
    assert [type(v) for v in jax.tree.leaves(s_ours, is_leaf=lambda v: isinstance(
        v, nnx.Variable))] == [type(v) for v in jax.tree.leaves(
            s_ref, is_leaf=lambda v: isinstance(v, nnx.Variable))]
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 3)) * 2 + 1, jnp.float32)
    ours(x), ours(x * 2)  # train: statistics move
    nnx.update(ref, nnx.state(ours))  # ours -> flax
    ours.eval(), ref.eval()
    np.testing.assert_allclose(f32(ours(x)), f32(ref(x)), rtol=1e-5, atol=1e-6)
    fresh = sbf.BatchNorm(3, rngs=nnx.Rngs(1))
    nnx.update(fresh, nnx.state(ref))  # flax -> ours
    fresh.eval()
    np.testing.assert_allclose(f32(fresh(x)), f32(ref(x)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="axis_name"):
        sbf.BatchNorm(3, axis_name="batch", rngs=nnx.Rngs(0))


def test_flax_linen_batchnorm_has_flax_variables():
    import flax.linen as nn

    x = jnp.ones((4, 3))
    v_ours = sbf.LinenBatchNorm(use_running_average=False).init(jax.random.key(0), x)
    v_ref = nn.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, v_ours) == jax.tree.map(jnp.shape, v_ref)

    class M(nn.Module):  # submodule names (BatchNorm_0) match too
        bn: type

        @nn.compact
        def __call__(self, x):
            return self.bn(use_running_average=False)(nn.Dense(3)(x))

    a = M(sbf.LinenBatchNorm).init(jax.random.key(0), x)
    b = M(nn.BatchNorm).init(jax.random.key(0), x)
    assert jax.tree.structure(a) == jax.tree.structure(b)


def test_flax_linen_init_normalizes_with_the_local_batch_like_flax():
    """flax.linen.BatchNorm's init output uses the batch's statistics (without axis_name)
    and leaves the running ones at their initial values; so does syncbn's, without a
    collective (flax's own test_batch_norm checks the output)."""
    import flax.linen as nn

    x = jax.random.normal(jax.random.key(1), (4, 3, 2)) * 3 + 1
    y, v = sbf.LinenBatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), x)
    y_ref, v_ref = nn.BatchNorm(use_running_average=False).init_with_output(
        jax.random.key(0), x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    jax.tree.map(np.testing.assert_array_equal, v, v_ref)


@pytest.mark.parametrize("x_dtype,param_dtype,dtype", [
    ("float32", "float32", "float16"), ("float32", "float16", None),
    ("bfloat16", "float32", None), ("float16", "float16", "float16")])
def test_flax_dtypes_are_flax_normalize_dtypes(x_dtype, param_dtype, dtype):
    """Computed in the promotion of x, scale and bias (x is not rounded to `dtype` first),
    returned in `dtype` when given: flax's _normalize, for linen and for nnx (whose default
    promote_dtype casts x to `dtype` first, as flax's does)."""
    import flax.linen as nn
    from flax import nnx

    x = (jax.random.normal(jax.random.key(1), (6, 3)) * 3 + 1).astype(x_dtype)
    kw = dict(use_running_average=False, dtype=dtype, param_dtype=param_dtype)
    y, _ = sbf.LinenBatchNorm(**kw).init_with_output(jax.random.key(0), x)
    y_ref, _ = nn.BatchNorm(**kw).init_with_output(jax.random.key(0), x)
    assert y.dtype == y_ref.dtype
    np.testing.assert_allclose(f32(y), f32(y_ref), rtol=1e-2, atol=1e-2)
    for promote in (None, lambda a, **_: a):  # flax's default, and none (as linen)
        extra = {} if promote is None else {"promote_dtype": promote}
        ours = sbf.BatchNorm(3, **kw, **extra, rngs=nnx.Rngs(0))
        ref = nnx.BatchNorm(3, **kw, **extra, rngs=nnx.Rngs(0))
        y, y_ref = ours(x), ref(x)
        assert y.dtype == y_ref.dtype
        np.testing.assert_allclose(f32(y), f32(y_ref), rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-3)


def test_import_syncbn_and_other_adapters_never_import_jax():
    code = ("import sys, syncbn, syncbn.numpy, syncbn.comm; syncbn.build_info(); "
            "assert not [m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', "
            "'flax')], sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


# ---- multi-rank jobs --------------------------------------------------------------------


class Job(NamedTuple):
    out: object  # the folder the ranks wrote to
    n: int
    stdout: str


def load(job, part):
    ranks = [dict(np.load(job.out / f"{part}_rank{r}.npz")) for r in range(job.n)]
    ref = job.out / f"{part}_ref.npz"
    return ranks, (dict(np.load(ref)) if ref.exists() else None)


@pytest.fixture(scope="module")
def job3(tmp_path_factory):
    """mpiexec -n 3, global batch split 3/0/2 (a rank with no samples)."""
    out = tmp_path_factory.mktemp("jax3")
    proc = run_mpi(3, WORKERS / "jax_worker.py", out, "3,0,2", "functional", "masked", "flax",
                   "pycomm", "order", "mismatch", timeout=480, env=MPI_ENV)
    return Job(out, 3, proc.stdout)


@pytest.fixture(scope="module")
def job2(tmp_path_factory):
    """mpiexec -n 2, global batch split 5/1."""
    out = tmp_path_factory.mktemp("jax2")
    proc = run_mpi(2, WORKERS / "jax_worker.py", out, "5,1", "keras", "masked", "order",
                   "example", timeout=480, env=MPI_ENV)
    return Job(out, 2, proc.stdout)


def test_functional_equals_flax_on_the_global_batch(job3):
    ranks, ref = load(job3, "functional")
    cases = sorted({k.rsplit("_", 1)[0] for k in ref})
    assert cases == ["nc_f32_eager", "nchw_bf16_jit", "nhwc_f32_jit"], cases
    for name in cases:  # NHWC/NCHW/NC, f32/bf16, jit/eager
        tol = dict(rtol=2e-2, atol=4e-2) if "bf16" in name else dict(rtol=1e-4, atol=2e-5)
        for s in range(3):  # SGD steps: parameters move with the rank-summed gradients
            for key in ("y", "dx"):  # this rank's rows of the global result
                k = f"{name}_{key}{s}"
                np.testing.assert_allclose(np.concatenate([r[k] for r in ranks]), ref[k],
                                           err_msg=k, **tol)
            for key in ("dscale", "dbias", "mean", "var"):  # summed / the same everywhere
                k = f"{name}_{key}{s}"
                for r in ranks:
                    np.testing.assert_allclose(r[k], ref[k], err_msg=k,
                                               **(tol if "bf16" in name else
                                                  dict(rtol=1e-4, atol=1e-4)))


@pytest.mark.parametrize("job", ["job3", "job2"])
def test_masked_statistics_equal_flax_and_keras_masked_batchnorm_on_the_global_batch(job,
                                                                                   request):
    """Masks of positions (some ranks passing none) and masks with the channel axis
    (per-channel counts), uneven ranks and an empty one (job3: 3/0/2; job2: 5/1): y, dx,
    the rank-summed parameter gradients and the running statistics of 3 jitted SGD steps
    equal flax's masked BatchNorm on the concatenated batch; keras' too (JAX backend)."""
    ranks, ref = load(request.getfixturevalue(job), "masked")
    names = sorted({k.rsplit("_", 1)[0] for k in ref if not k.startswith("keras")})
    assert names == ["chan_nchw", "pos_ncl_mixed", "pos_nhwc"], names
    for k in ref:
        if k.endswith(("_y0", "_y1", "_y2", "_dx0", "_dx1", "_dx2")) or k.endswith("keras_last_y") \
                or k.endswith("keras_first_y"):  # this rank's rows of the global result
            got = np.concatenate([r[k] for r in ranks])
        else:  # summed gradients and running statistics: the same on every rank
            got = None
        if got is not None:
            np.testing.assert_allclose(got, ref[k], rtol=1e-4, atol=1e-4, err_msg=k)
            continue
        for r in ranks:
            np.testing.assert_allclose(r[k], ref[k], rtol=1e-4, atol=1e-4, err_msg=k)


def test_flax_nnx_and_linen_train_like_flax_batchnorm_on_the_global_batch(job3):
    ranks, ref = load(job3, "flax")
    assert ref and any(k.startswith("linen/") for k in ref)
    for k in ref:  # every parameter and batch statistic after 3 SGD steps; eval output
        for r in ranks:
            np.testing.assert_allclose(r[k], ref[k], rtol=1e-4, atol=2e-5, err_msg=k)


def test_python_communicator_runs_on_xla_threads_and_mpi4py_split_works(job3):
    ranks, ref = load(job3, "pycomm")
    for rank, r in enumerate(ranks):  # MPI.COMM_WORLD.Split: ranks {0, 2} and {1} (empty)
        want = ref.get(f"dx_split{rank}", np.zeros((0, 4, 3)))
        np.testing.assert_allclose(r["dx_split"], want, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([r["dx"] for r in ranks]), ref["dx"],
                               rtol=1e-4, atol=1e-4)
    for r in ranks:
        np.testing.assert_allclose(r["mean"], ref["mean"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(r["var"], ref["var"], rtol=1e-5, atol=1e-6)
        assert int(r["calls"]) == 8  # 2 jitted steps x (2 forwards + 2 backwards); eval: 0


@pytest.mark.parametrize("job", ["job3", "job2"])
def test_collective_order_two_branches_300_steps_equal_the_reference(job, request):
    ranks, ref = load(request.getfixturevalue(job), "order")
    for k in ref:
        for r in ranks:
            np.testing.assert_allclose(r[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_fingerprint_mismatch_under_jit_raises_the_clear_error_on_every_rank(job3):
    ranks, _ = load(job3, "mismatch")
    for rank, r in enumerate(ranks):
        msg = str(r["message"])
        assert str(r["kind"]) == "jax.errors.JaxRuntimeError", (rank, r["kind"], msg)
        assert "syncbn.CollectiveMismatchError" in msg and "ranks disagree" in msg, msg
        assert f"rank {rank} of 3" in msg and re.search(r"layer 'net\.bn3[12]'", msg), msg


def test_keras_on_jax_fit_and_custom_loop_equal_keras_batchnormalization(job2):
    ranks, ref = load(job2, "keras")
    for r in ranks:
        assert "renorm" in str(r["renorm"]) and "not supported" in str(r["renorm"])
    for k in ref:
        if k == "fit/loss":  # each rank reports its share of the global loss
            np.testing.assert_allclose(sum(r[k] for r in ranks), ref[k], rtol=1e-5)
            continue
        for r in ranks:
            np.testing.assert_allclose(r[k], ref[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_jax_mpi_example_syncbn_follows_the_one_process_run(job2):
    # examples/jax_mpi.py, 10 steps on 2 ranks, run as the last part of the job
    m = re.search(r"max \|param diff\| ([0-9.e+-]+)", job2.stdout)
    assert m and float(m.group(1)) < 1e-10, job2.stdout  # float64: equal to rounding
    assert (job2.out / "jax_mpi_loss.png").stat().st_size > 10_000


def test_two_grads_and_a_forward_in_one_jit_are_chained():
    st = (jnp.zeros(4), jnp.ones(4))

    def step(p, x):
        g1 = jax.grad(lambda p: (sbj.batch_norm(x, p, None, st, layer=1)[0] ** 3).sum())(p)
        g2 = jax.grad(lambda p: (sbj.batch_norm(2 * x, p, None, st, layer=2)[0] ** 3).sum())(p)
        return g1 + g2 + sbj.batch_norm(x, None, None, st, layer=3)[0].sum()

    chain = collective_chain(step, jnp.ones(4), jnp.ones((3, 4)))
    assert [t for _, t, _, _ in chain] == ["syncbn_forward", "syncbn_backward"] * 2 + [
        "syncbn_forward"]
    for i in range(1, len(chain)):  # backward after its forward by the saved statistics,
        prev, (_, kind, token_src, all_src) = chain[i - 1][0], chain[i]  # the rest by token
        assert prev in all_src if kind == "syncbn_backward" else token_src == {prev}, chain


def test_masks_flax_semantics_and_errors():
    """A mask broadcastable to x (flax's rule) in training; eval ignores it (as flax);
    a shape that does not broadcast is a ValueError naming mask, before any collective."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((6, 4)), jnp.float32)
    st = (jnp.zeros(4), jnp.ones(4))
    with pytest.raises(ValueError, match=r"^mask: expected a shape that broadcasts to x's"):
        sbj.batch_norm(x, stats=st, mask=jnp.ones((5,), bool))
    y_eval, _ = sbj.batch_norm(x, stats=st, training=False, mask=jnp.zeros((6, 1), bool))
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-6)
    m = jnp.asarray([1, 1, 0, 1, 0, 1], bool)[:, None]  # (6, 1): positions
    y, (mean, var) = sbj.batch_norm(x, stats=st, mask=m, momentum=0.0)
    sel = np.asarray(x)[np.asarray(m[:, 0])]
    np.testing.assert_allclose(mean, sel.mean(0), rtol=1e-5)
    np.testing.assert_allclose(var, sel.var(0), rtol=1e-5)
