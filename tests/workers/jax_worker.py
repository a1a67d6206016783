"""One rank of the JAX / Flax / Keras-on-JAX multi-rank tests (tests/test_jax.py).

Usage: mpiexec -n N python -m mpi4py jax_worker.py OUT_DIR SIZES PART [PART ...]

SIZES: the global batch split, e.g. "3,0,2" (a rank may have 0 samples). Every rank makes
the same global data from fixed seeds and takes its slice; it writes what it got to
OUT_DIR/{part}_rank{r}.npz, and rank 0 also writes the reference (flax's or keras'
BatchNorm trained in one process on the concatenated batch) to OUT_DIR/{part}_ref.npz.
Parameter gradients are summed across ranks with mpi4py (data parallelism), so every
rank's parameters must equal the reference's after each SGD step.
"""

import os
import sys
import time
import zlib

os.environ["KERAS_BACKEND"] = "jax"  # whatever the parent (pytest) process uses

import jax  # noqa: E402


def fast_keys(on=True):
    """Compiling threefry's initializers dominates a small flax test's start-up on a busy
    2-core machine; rbg keys compile in a fraction of that (ours and the reference use the
    same). Keras makes raw threefry keys itself: off for it."""
    jax.config.update("jax_default_prng_impl", "unsafe_rbg" if on else "threefry2x32")
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

import syncbn.jax as sbj  # noqa: E402

world = MPI.COMM_WORLD
rank, nranks = world.Get_rank(), world.Get_size()


def wait(req):
    """MPI's blocking calls spin; with more ranks than cores (CI has 2) a spinning rank
    starves the ones it waits for. Poll, then sleep. (The core's own MPI wait sleeps too
    when SYNCBN_COLLECTIVE_TIMEOUT is set, as the tests do.)"""
    polls = 0
    while not req.Test():
        polls += 1
        if polls > 200:
            time.sleep(0.0002 if polls < 5000 else 0.002)


def allreduce(tree):
    """Sums a pytree of arrays across ranks (host side, outside jit)."""
    def one(a):
        a = np.array(a, dtype=np.float64)
        wait(world.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM))
        return a
    return jax.tree.map(one, tree)


def barrier():
    wait(world.Ibarrier())


def f64(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def save(out, part, data, ref=False):
    name = f"{part}_ref.npz" if ref else f"{part}_rank{rank}.npz"
    np.savez(os.path.join(out, name), **data)


class Slicer:
    def __init__(self, sizes):
        self.sizes = sizes
        self.off, self.n = sum(sizes[:rank]), sizes[rank]
        self.N = sum(sizes)

    def __call__(self, a):
        return a[self.off:self.off + self.n]


# ---- functional: syncbn.jax.batch_norm against flax.nnx.BatchNorm ----------------------

FUNCTIONAL_CASES = [
    # name, per-sample shape, channel axis, dtype, jit
    ("nhwc_f32_jit", (5, 4, 3), -1, "float32", True),
    ("nchw_bf16_jit", (3, 5, 4), 1, "bfloat16", True),
    ("nc_f32_eager", (6,), 1, "float32", False),
]


def flax_sgd_reference(name, C, axis, scale0, bias0, xs, gs, ms=None, lr=0.1):
    """flax's nnx.BatchNorm (momentum 0.9) on the concatenated batch, one jitted SGD step
    per x in xs with loss sum(y * g) (and mask ms[s]): the keys the ranks write."""
    from flax import nnx

    bn = nnx.BatchNorm(C, axis=axis, momentum=0.9, rngs=nnx.Rngs(0))
    bn.scale[...], bn.bias[...] = jnp.asarray(scale0), jnp.asarray(bias0)

    def loss_ref(bn, x, g, m):
        y = bn(x, mask=m)
        return (y.astype(jnp.float32) * g).sum(), y

    ref_step = nnx.jit(nnx.value_and_grad(loss_ref, argnums=(0, 1), has_aux=True))
    ref = {}
    for s in range(len(xs)):
        (_, y), (gbn, dx) = ref_step(bn, xs[s], gs[s], None if ms is None else ms[s])
        ref[f"{name}_y{s}"], ref[f"{name}_dx{s}"] = f64(y), f64(dx)
        ref[f"{name}_dscale{s}"] = f64(gbn["scale"][...])
        ref[f"{name}_dbias{s}"] = f64(gbn["bias"][...])
        bn.scale[...] = bn.scale[...] - lr * gbn["scale"][...]
        bn.bias[...] = bn.bias[...] - lr * gbn["bias"][...]
        ref[f"{name}_mean{s}"], ref[f"{name}_var{s}"] = f64((bn.mean[...], bn.var[...]))
    return ref


def part_functional(out, sl):

    res, ref = {}, {}
    for name, shape, axis, dtype, use_jit in FUNCTIONAL_CASES:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        C = shape[axis - 1] if axis > 0 else shape[axis]
        steps = 3
        xs = [rng.standard_normal((sl.N,) + shape) * 2 + 3 for _ in range(steps)]
        gs = [rng.standard_normal((sl.N,) + shape) for _ in range(steps)]
        scale0 = rng.uniform(0.5, 1.5, C).astype(np.float32)
        bias0 = rng.standard_normal(C).astype(np.float32)

        def loss_ours(params, stats, x, g, _axis=axis, _name=name):
            y, new = sbj.batch_norm(x, params[0], params[1], stats, momentum=0.9,
                                    axis=_axis, layer=7, layer_name=_name)
            return (y.astype(jnp.float32) * g).sum(), (y, new)

        step = jax.value_and_grad(loss_ours, argnums=(0, 2), has_aux=True)
        step = jax.jit(step) if use_jit else step
        params = (jnp.asarray(scale0), jnp.asarray(bias0))
        stats = (jnp.zeros(C, jnp.float32), jnp.ones(C, jnp.float32))
        for s in range(steps):
            x = jnp.asarray(sl(xs[s]), dtype)
            g = jnp.asarray(sl(gs[s]), jnp.float32)
            (_, (y, stats)), (dp, dx) = step(params, stats, x, g)
            dp = allreduce(dp)  # local parameter gradients: summed like DDP
            res[f"{name}_y{s}"], res[f"{name}_dx{s}"] = f64(y), f64(dx)
            res[f"{name}_dscale{s}"], res[f"{name}_dbias{s}"] = dp
            params = tuple(jnp.asarray(p - 0.1 * d, jnp.float32)
                           for p, d in zip(params, dp, strict=True))
            res[f"{name}_mean{s}"], res[f"{name}_var{s}"] = f64(stats)
        if rank == 0:  # flax's BatchNorm on the concatenated batch
            # Flax promotes a bfloat16 x to float32 with float32 parameters: the same
            # bfloat16-rounded inputs, computed in float32.
            ref.update(flax_sgd_reference(
                name, C, axis, scale0, bias0,
                [jnp.asarray(jnp.asarray(x, dtype), jnp.float32) for x in xs],
                [jnp.asarray(g) for g in gs]))
    save(out, "functional", res)
    if rank == 0:
        save(out, "functional", ref, ref=True)


# ---- masked: masked statistics against flax's masked BatchNorm -----------------------------

MASKED_CASES = [
    # name, per-sample shape, channel axis, per-sample mask shape (None: the mask varies
    # along the channel axis, x's shape: per-channel counts), odd ranks pass mask=None
    ("pos_nhwc", (5, 4, 3), -1, (5, 4, 1), False),
    ("pos_ncl_mixed", (6, 4), 1, (1, 4), True),
    ("chan_nchw", (3, 5, 4), 1, None, False),
]


def part_masked(out, sl):
    """syncbn.jax.batch_norm(mask=...) under jit for 3 SGD steps against flax's
    nnx.BatchNorm(mask=...) on the concatenated batch; masked-out elements hold 40, far
    from the counted ones (mean 3, std 2): counting one would move the statistics. Also
    keras' masked moments on the JAX backend: SyncBatchNormalization(mask=...) against
    BatchNormalization on the global batch, channels-last (a mask of positions) and
    channels-first (per-channel counts)."""

    res, ref = {}, {}
    for name, shape, axis, mshape, mixed in MASKED_CASES:
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        C = shape[axis - 1] if axis > 0 else shape[axis]
        steps = 3
        ms = [rng.random((sl.N,) + (mshape or shape)) > 0.25 for _ in range(steps)]
        for m in ms:  # at least 2 counted values per channel (1 raises, as unmasked)
            m[:2] = True
        if mixed:  # the ranks that pass no mask: every one of their positions counts
            for m in ms:
                for r in range(1, nranks, 2):
                    m[sum(sl.sizes[:r]):sum(sl.sizes[:r + 1])] = True
        xs = [np.where(np.broadcast_to(m, (sl.N,) + shape),
                       rng.standard_normal((sl.N,) + shape) * 2 + 3, 40.0) for m in ms]
        gs = [rng.standard_normal((sl.N,) + shape) for _ in range(steps)]
        scale0 = rng.uniform(0.5, 1.5, C).astype(np.float32)
        bias0 = rng.standard_normal(C).astype(np.float32)

        def loss_ours(params, stats, x, g, m, _axis=axis):
            y, new = sbj.batch_norm(x, params[0], params[1], stats, momentum=0.9, axis=_axis,
                                    layer=9, mask=m)
            return (y * g).sum(), (y, new)

        step = jax.jit(jax.value_and_grad(loss_ours, argnums=(0, 2), has_aux=True))
        params = (jnp.asarray(scale0), jnp.asarray(bias0))
        stats = (jnp.zeros(C, jnp.float32), jnp.ones(C, jnp.float32))
        for s in range(steps):
            m = None if mixed and rank % 2 else jnp.asarray(sl(ms[s]))
            (_, (y, stats)), (dp, dx) = step(params, stats, jnp.asarray(sl(xs[s]), jnp.float32),
                                             jnp.asarray(sl(gs[s]), jnp.float32), m)
            dp = allreduce(dp)
            res[f"{name}_y{s}"], res[f"{name}_dx{s}"] = f64(y), f64(dx)
            res[f"{name}_dscale{s}"], res[f"{name}_dbias{s}"] = dp
            params = tuple(jnp.asarray(p - 0.1 * d, jnp.float32)
                           for p, d in zip(params, dp, strict=True))
            res[f"{name}_mean{s}"], res[f"{name}_var{s}"] = f64(stats)
        if rank == 0:
            ref.update(flax_sgd_reference(
                name, C, axis, scale0, bias0, [jnp.asarray(x, jnp.float32) for x in xs],
                [jnp.asarray(g, jnp.float32) for g in gs], [jnp.asarray(m) for m in ms]))

    # keras on jax: one training call each (keras' layer keeps its state in variables)
    import keras

    from syncbn.keras import SyncBatchNormalization

    fast_keys(False)
    rng = np.random.default_rng(17)
    x = rng.standard_normal((sl.N, 4, 3)).astype(np.float32) * 3 + 1
    mask = rng.random((sl.N, 4)) > 0.3
    mask[:2] = True
    for label, axis in (("keras_last", -1), ("keras_first", 1)):
        ours = SyncBatchNormalization(axis=axis, momentum=0.5)
        y = ours(jnp.asarray(sl(x)), training=True, mask=jnp.asarray(sl(mask)))
        res[f"{label}_y"] = f64(y)
        res[f"{label}_mean"] = f64(ours.moving_mean.value)
        res[f"{label}_var"] = f64(ours.moving_variance.value)
        if rank == 0:
            bn = keras.layers.BatchNormalization(axis=axis, momentum=0.5)
            y = bn(jnp.asarray(x), training=True, mask=jnp.asarray(mask))
            ref[f"{label}_y"] = f64(y)
            ref[f"{label}_mean"] = f64(bn.moving_mean.value)
            ref[f"{label}_var"] = f64(bn.moving_variance.value)
    save(out, "masked", res)
    if rank == 0:
        save(out, "masked", ref, ref=True)


# ---- flax: a small CNN with syncbn.flax.BatchNorm against nnx.BatchNorm ------------------


def make_cnn(bn_cls, seed=0):
    """Conv -> BN over channels-last -> Conv -> BN over channels-first (axis=1, no scale)
    -> Dense -> BN over (N, C)."""
    from flax import nnx

    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(2, 4, (3, 3), rngs=rngs)
            self.bn1 = bn_cls(4, momentum=0.8, rngs=rngs)
            self.c2 = nnx.Conv(4, 6, (3, 3), rngs=rngs)
            self.bn2 = bn_cls(6, axis=1, use_scale=False, rngs=rngs)
            self.fc = nnx.Linear(6, 3, rngs=rngs)
            self.bn3 = bn_cls(3, rngs=rngs)

        def __call__(self, x):  # x: NHWC
            x = nnx.relu(self.bn1(self.c1(x)))
            x = jnp.transpose(self.c2(x), (0, 3, 1, 2))  # NCHW
            x = nnx.relu(self.bn2(x)).mean(axis=(2, 3))
            return self.bn3(self.fc(x))

    return CNN(nnx.Rngs(seed))


def train_cnn(model, xs, ts, N, use_jit, steps, lr=0.1, sum_grads=True):
    from flax import nnx

    def loss(m, x, t):
        return ((m(x) - t) ** 2).sum() / N

    grad = nnx.value_and_grad(loss)
    grad = nnx.jit(grad) if use_jit else grad
    losses = []
    for s in range(steps):
        lv, g = grad(model, xs[s], ts[s])
        params = nnx.state(model, nnx.Param)
        g = allreduce(g) if sum_grads else f64(g)
        nnx.update(model, jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), params, g))
        losses.append(float(lv))
    return losses


def state_dict(model):
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model))
    return {"/".join(map(str, k)): np.asarray(v[...], np.float64) for k, v in flat}


def part_flax(out, sl):
    from flax import nnx

    import syncbn.flax as sbf

    rng = np.random.default_rng(11)
    steps = 3
    xs = [rng.standard_normal((sl.N, 7, 7, 2)).astype(np.float32) for _ in range(steps)]
    ts = [rng.standard_normal((sl.N, 3)).astype(np.float32) for _ in range(steps)]
    res, ref = {}, {}
    m = make_cnn(sbf.BatchNorm)
    train_cnn(m, [jnp.asarray(sl(x)) for x in xs], [jnp.asarray(sl(t)) for t in ts], sl.N,
              True, steps)
    res.update({f"cnn/{k}": v for k, v in state_dict(m).items()})
    m.eval()  # eval never communicates: ranks may run it on anything
    res["cnn/eval"] = np.asarray(m(jnp.asarray(xs[0][:2])), np.float64)
    if rank == 0:
        r = make_cnn(nnx.BatchNorm)
        train_cnn(r, [jnp.asarray(x) for x in xs], [jnp.asarray(t) for t in ts], sl.N, True,
                  steps, sum_grads=False)
        ref.update({f"cnn/{k}": v for k, v in state_dict(r).items()})
        r.eval()
        ref["cnn/eval"] = np.asarray(r(jnp.asarray(xs[0][:2])), np.float64)
    # linen: one module, 2 jitted SGD steps
    import flax.linen as nn
    from flax import traverse_util

    def linen_model(bn):
        class M(nn.Module):
            @nn.compact
            def __call__(self, x, train):
                x = nn.Dense(4)(x)
                return bn(momentum=0.7)(x, use_running_average=not train)
        return M()

    lx = [rng.standard_normal((sl.N, 5)).astype(np.float32) for _ in range(2)]
    for label, bn, xs_ in (("ours", sbf.LinenBatchNorm, [sl(x) for x in lx]),
                           ("ref", nn.BatchNorm, lx)):
        if label == "ref" and rank != 0:
            continue
        m = linen_model(bn)
        v = m.init(jax.random.key(1), jnp.zeros((2, 5)), False)

        @jax.jit
        def step(v, x, m=m):
            def loss(p):
                y, upd = m.apply({"params": p, "batch_stats": v["batch_stats"]}, x, True,
                                 mutable=["batch_stats"])
                return (y ** 3).sum() / sl.N, upd
            (lv, upd), g = jax.value_and_grad(loss, has_aux=True)(v["params"])
            return g, upd["batch_stats"]

        for x in xs_:
            g, bstats = step(v, jnp.asarray(x))
            g = allreduce(g) if label == "ours" else f64(g)
            params = jax.tree.map(lambda p, d: (p - 0.1 * d).astype(p.dtype), v["params"], g)
            v = {"params": params, "batch_stats": bstats}
        flat = {"/".join(k): np.asarray(a, np.float64)
                for k, a in traverse_util.flatten_dict(v).items()}
        (res if label == "ours" else ref).update({f"linen/{k}": a for k, a in flat.items()})
    save(out, "flax", res)
    if rank == 0:
        save(out, "flax", ref, ref=True)


# ---- keras on JAX: model.fit and a custom loop ----------------------------------------


def make_keras(bn):
    import keras

    keras.utils.set_random_seed(3)
    return keras.Sequential([
        keras.Input((6, 6, 2)), keras.layers.Conv2D(4, 3), bn(momentum=0.8),
        keras.layers.ReLU(), keras.layers.Flatten(), keras.layers.Dense(5),
        bn(axis=-1, momentum=0.9, center=False), keras.layers.Dense(1)])


def summing_sgd(lr):
    """SGD whose jitted update first sums the gradients across ranks (one host callback
    that takes every gradient, so it runs after all of syncbn's backward collectives)."""
    import keras

    class SummingSGD(keras.optimizers.SGD):
        def stateless_apply(self, optimizer_variables, grads, trainable_variables):
            shapes = [jax.ShapeDtypeStruct(g.shape, g.dtype) for g in grads]

            def host_sum(*gs):
                return [np.asarray(a, np.float64).astype(g.dtype)
                        for a, g in zip(allreduce(list(gs)), gs, strict=True)]

            grads = jax.pure_callback(host_sum, shapes, *grads)
            return super().stateless_apply(optimizer_variables, grads, trainable_variables)

    return SummingSGD(learning_rate=lr)


def part_keras(out, sl):
    import keras

    from syncbn.keras import SyncBatchNormalization

    assert keras.backend.backend() == "jax"
    fast_keys(False)
    try:
        SyncBatchNormalization(renorm=True)
        renorm = "accepted"
    except ValueError as e:
        renorm = str(e)
    rng = np.random.default_rng(5)
    x = rng.standard_normal((sl.N, 6, 6, 2)).astype(np.float32)
    t = rng.standard_normal((sl.N, 1)).astype(np.float32)
    res, ref = {}, {}

    def weights(m):
        return {f"{i}_{w.name}": np.asarray(w.value, np.float64) for i, w in enumerate(m.weights)}

    def global_mse(n):  # the loss of the concatenated batch: sum / N on every rank
        def loss(y, p):
            return keras.ops.mean((y - p) ** 2, axis=-1) * (n / sl.N)
        return loss

    # model.fit: the jit-compiled train step (no empty rank here: fit runs no step then).
    if min(sl.sizes) > 0:
        m = make_keras(SyncBatchNormalization)
        m.compile(optimizer=summing_sgd(0.1), loss=global_mse(sl.n), jit_compile=True)
        h = m.fit(sl(x), sl(t), batch_size=max(sl.n, 1), epochs=3, shuffle=False, verbose=0)
        res.update({f"fit/{k}": v for k, v in weights(m).items()})
        res["fit/loss"] = np.asarray(h.history["loss"])
    # a custom loop: stateless_call under jax.jit, gradients summed on the host
    m = make_keras(SyncBatchNormalization)
    tv, ntv = [v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables]

    @jax.jit
    def step(tv, ntv, xb, tb):
        def loss(tv):
            y, ntv2 = m.stateless_call(tv, ntv, xb, training=True)
            return ((y - tb) ** 2).sum() / sl.N, ntv2
        (lv, ntv2), g = jax.value_and_grad(loss, has_aux=True)(tv)
        return g, ntv2

    for _s in range(3):
        g, ntv = step(tv, ntv, jnp.asarray(sl(x)), jnp.asarray(sl(t)))
        g = allreduce(g)
        tv = [(p - 0.1 * d).astype(p.dtype) for p, d in zip(tv, g, strict=True)]
    for v, a in zip(m.trainable_variables, tv, strict=True):
        v.assign(a)
    for v, a in zip(m.non_trainable_variables, ntv, strict=True):
        v.assign(a)
    res.update({f"loop/{k}": v for k, v in weights(m).items()})
    res["renorm"] = np.asarray(renorm)
    res["loop/infer"] = np.asarray(m(x[:3], training=False), np.float64)
    if rank == 0:
        r = make_keras(keras.layers.BatchNormalization)
        r.compile(optimizer=keras.optimizers.SGD(0.1), loss=global_mse(sl.N))
        h = r.fit(x, t, batch_size=sl.N, epochs=3, shuffle=False, verbose=0)
        ref.update({f"fit/{k}": v for k, v in weights(r).items()})
        ref.update({f"loop/{k}": v for k, v in weights(r).items()})
        ref["fit/loss"] = np.asarray(h.history["loss"])
        ref["loop/infer"] = np.asarray(r(x[:3], training=False), np.float64)
    save(out, "keras", res)
    if rank == 0:
        save(out, "keras", ref, ref=True)


# ---- order: two independent branches of SyncBN layers, 300 steps -----------------------


def make_branches(bn_cls, C, seed=0):
    from flax import nnx

    class Branches(nnx.Module):
        """Two branches with no data dependency between them until the end: XLA may run
        their collectives in any order unless they are chained."""

        def __init__(self, rngs):
            self.a = nnx.List([bn_cls(C, momentum=0.9, rngs=rngs) for _ in range(3)])
            self.b = nnx.List([bn_cls(C, momentum=0.9, rngs=rngs) for _ in range(3)])
            self.w = nnx.Param(jnp.ones((C,)))

        def __call__(self, x):
            a, b = x, x[..., ::-1] * 2.0 + 1.0
            for bn in self.a:
                a = jnp.tanh(bn(a))
            for bn in self.b:
                b = jnp.sin(bn(b)) * self.w[...]
            return a * b

    return Branches(nnx.Rngs(seed))


def train_functional(model, batches, N, steps, lr, sum_grads):
    """`steps` SGD steps of a flax model as two jitted functions around one host all-reduce
    of the flattened gradients (nnx.jit's per-call overhead would dominate here)."""
    from flax import nnx
    from jax.flatten_util import ravel_pytree

    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def grads(params, stats, x, t):
        m = nnx.merge(graphdef, params, stats)
        _, g = nnx.value_and_grad(lambda m: ((m(x) - t) ** 2).sum() / N)(m)
        return ravel_pytree(g)[0], nnx.state(m, nnx.BatchStat)

    @jax.jit
    def update(params, flat):
        return jax.tree.map(lambda p, d: (p - lr * d).astype(p.dtype), params,
                            ravel_pytree(params)[1](flat))

    for s in range(steps):
        x, t = batches[s % len(batches)]
        flat, stats = grads(params, stats, x, t)
        flat = np.array(flat, np.float64)  # a writable copy
        if sum_grads:
            world.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        params = update(params, jnp.asarray(flat, jnp.float32))
    nnx.update(model, params, stats)


def part_order(out, sl, steps=300):
    from flax import nnx

    import syncbn.flax as sbf

    C, hw = 8, 16  # both branches busy at once: without the token this fails 3 of 3 runs
    rng = np.random.default_rng(7)
    x_all = rng.standard_normal((4, sl.N, hw, hw, C)).astype(np.float32)
    t_all = rng.standard_normal((4, sl.N, hw, hw, C)).astype(np.float32)
    m = make_branches(sbf.BatchNorm, C)
    t0 = time.time()
    batches = [(jnp.asarray(sl(x)), jnp.asarray(sl(t)))
               for x, t in zip(x_all, t_all, strict=True)]
    train_functional(m, batches, sl.N, steps, 1e-3, True)
    res = state_dict(m)
    res["seconds"] = np.asarray(time.time() - t0)
    save(out, "order", res)
    if rank == 0:
        r = make_branches(nnx.BatchNorm, C)
        batches = [(jnp.asarray(x), jnp.asarray(t)) for x, t in zip(x_all, t_all, strict=True)]
        train_functional(r, batches, sl.N, steps, 1e-3, False)
        save(out, "order", state_dict(r), ref=True)


# ---- a Python-object communicator on XLA's threads -------------------------------------


class CountingComm:
    def __init__(self):
        self.rank, self.size, self.calls = rank, nranks, 0

    def allreduce(self, buf):
        self.calls += 1
        world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)


def part_pycomm(out, sl):
    comm = CountingComm()
    rng = np.random.default_rng(9)
    x = rng.standard_normal((sl.N, 4, 3)).astype(np.float32)
    stats = (jnp.zeros(3), jnp.ones(3))

    @jax.jit
    def f(x):
        def loss(x):
            y, new = sbj.batch_norm(x, None, None, stats, comm=comm, layer=21)
            y2, _ = sbj.batch_norm(y * 2, None, None, None, comm=comm, layer=22)
            return (y2 ** 3).sum(), new
        return jax.grad(loss, has_aux=True)(x)

    dx, new = f(jnp.asarray(sl(x)))
    dx, new = f(jnp.asarray(sl(x)))
    y_eval, _ = jax.jit(lambda x: sbj.batch_norm(x, None, None, stats, training=False,
                                                 comm=comm))(jnp.asarray(sl(x)))
    # an mpi4py sub-communicator from Split (even and odd ranks normalize separately)
    sub = world.Split(color=rank % 2, key=rank)

    @jax.jit
    def g(x):
        return jax.value_and_grad(
            lambda x: (sbj.batch_norm(x, None, None, None, comm=sub, layer=23)[0] ** 3).sum())(x)

    _, dx_split = g(jnp.asarray(sl(x)))
    save(out, "pycomm", dict(dx=f64(dx), mean=f64(new[0]), var=f64(new[1]),
                             calls=np.asarray(comm.calls), y_eval=f64(y_eval),
                             dx_split=f64(dx_split)))
    if rank == 0:
        def ref_loss(x):
            def bn(x):
                return (x - x.mean((0, 1))) / jnp.sqrt(x.var((0, 1)) + 1e-5)
            return (bn(bn(x) * 2) ** 3).sum()
        def ref_split(x):
            return (((x - x.mean((0, 1))) / jnp.sqrt(x.var((0, 1)) + 1e-5)) ** 3).sum()

        xr = jnp.asarray(x)
        groups = {c: [r for r in range(nranks) if r % 2 == c] for c in (0, 1)}
        dx_split = {}
        for members in groups.values():  # each group's rows, in rank order
            rows = np.concatenate([np.arange(sum(sl.sizes[:r]), sum(sl.sizes[:r + 1]))
                                   for r in members]).astype(int)
            if len(rows):
                d = np.asarray(jax.grad(ref_split)(xr[rows]), np.float64)
                for r in members:
                    lo = sum(sl.sizes[q] for q in members if q < r)
                    dx_split[f"dx_split{r}"] = d[lo:lo + sl.sizes[r]]
        save(out, "pycomm", dict(dx=f64(jax.grad(ref_loss)(xr)),
                                 mean=f64(0.01 * xr.mean((0, 1))),
                                 var=f64(0.99 + 0.01 * xr.var((0, 1))), **dx_split), ref=True)


# ---- mismatch: ranks run two layers in different orders under jit ----------------------


def part_mismatch(out, sl):
    stats = (jnp.zeros(3), jnp.ones(3))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((max(sl.n, 1), 3)), jnp.float32)
    order = (31, 32) if rank == 0 else (32, 31)  # rank 0 runs the layers the other way

    @jax.jit
    def f(x):
        y = x
        for layer in order:
            y, _ = sbj.batch_norm(y, None, None, stats, layer=layer,
                                  layer_name=f"net.bn{layer}")
        return y

    try:
        np.asarray(f(x))
        msg, kind = "no error", ""
    except Exception as e:  # what a user of jax sees
        msg, kind = str(e), f"{type(e).__module__}.{type(e).__qualname__}"
    save(out, "mismatch", dict(message=np.asarray(msg), kind=np.asarray(kind)))


# ---- examples/jax_mpi.py, run in this job to spare a JAX start-up --------------------------


def part_example(out, sl):
    """Runs examples/jax_mpi.py (10 steps) as `python -m mpi4py examples/jax_mpi.py` would;
    it turns on jax_enable_x64 for the rest of the process, so it goes last."""
    import runpy

    path = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "jax_mpi.py")
    sys.argv = [path, "--steps", "10", "--out", os.path.join(out, "jax_mpi_loss.png")]
    runpy.run_path(path, run_name="__main__")


def main(out, sizes, *parts):
    sl = Slicer([int(s) for s in sizes.split(",")])
    assert len(sl.sizes) == nranks, (sl.sizes, nranks)
    for p in parts:
        fast_keys(True)
        t0 = time.time()
        globals()[f"part_{p}"](out, sl)
        barrier()  # rank 0's reference: the others sleep meanwhile
        if rank == 0:
            print(f"part {p}: {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
