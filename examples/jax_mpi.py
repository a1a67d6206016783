"""A Flax CNN trained with a tiny per-rank batch three ways under mpiexec: what SyncBN buys
in JAX.

    SYNCBN_WITH_JAX=ON .venv/bin/pip install -e '.[jax,examples]'
    .venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py examples/jax_mpi.py
    .venv/bin/python examples/jax_mpi.py     # one process works too

The JAX twin of examples/train_digits.py: scikit-learn's bundled digits (1797 8x8
images, no download), two 3x3 convolutions with BatchNorm, a hidden layer with
BatchNorm (one value per image and channel: per-rank statistics of 4 images are as noisy
as they get), 4 images per rank and step. From the same initialization and sample order:

  1. SyncBN: flax.nnx.BatchNorm swapped for syncbn.flax.BatchNorm (its state loaded from
     the flax model), so every batch norm uses the statistics of the global batch, inside
     the jax.jit-compiled step;
  2. plain flax BatchNorm per rank, gradients still summed across ranks;
  3. one process, plain BatchNorm, on the whole global batch (rank 0): the reference.

Each rank's loss is the summed cross-entropy of its images divided by the global batch, so
the rank-summed gradients are those of the global mean loss and 1 follows 3 step for
step: rank 0 prints their largest parameter difference, the test accuracy of all three
(eval: running statistics) and saves the loss curves (--out). float64 by default
(jax_enable_x64), which keeps the parameters of 1 and 3 equal to rounding over the run
(flax keeps running statistics in float32 either way); in float32 they start ~1e-7 apart
and training amplifies that, as for any two float32 runs.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from mpi4py import MPI

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "jax_mpi_loss.png"),
                    help="where to save the loss curves (PNG)")
    ap.add_argument("--per-rank", type=int, default=4, help="images per rank and step")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


args = parse_args()
import jax  # noqa: E402

jax.config.update("jax_enable_x64", args.dtype == "float64")
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import syncbn.flax  # noqa: E402

DTYPE = jnp.dtype(args.dtype)


def load_data():
    """Digits as (N, 8, 8, 1) in [0, 1]; a fixed 80/20 split, the same on every rank."""
    d = load_digits()
    x = (d.images / 16.0)[..., None].astype(DTYPE)
    perm = np.random.default_rng(1234).permutation(len(d.target))
    n_test = len(perm) // 5
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], d.target[train]), (x[test], d.target[test])


class CNN(nnx.Module):
    def __init__(self, bn, rngs):
        kw = dict(param_dtype=DTYPE, rngs=rngs)
        self.c1 = nnx.Conv(1, 16, (3, 3), use_bias=False, **kw)
        self.bn1 = bn(16, **kw)
        self.c2 = nnx.Conv(16, 32, (3, 3), use_bias=False, **kw)
        self.bn2 = bn(32, **kw)
        self.fc1 = nnx.Linear(32 * 4 * 4, 64, use_bias=False, **kw)
        self.bn3 = bn(64, **kw)  # one value per image and channel
        self.fc2 = nnx.Linear(64, 10, **kw)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.c1(x)))
        x = nnx.relu(self.bn2(self.c2(x)))
        x = nnx.max_pool(x, (2, 2), (2, 2)).reshape(x.shape[0], -1)
        return self.fc2(nnx.relu(self.bn3(self.fc1(x))))


def trainer(model, global_batch, sum_over_ranks):
    """One SGD-with-momentum step: a jitted gradient, the gradients (and the loss, for
    the plot) summed across ranks in one host all-reduce (what DDP does), a jitted update."""
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    velocity = jax.tree.map(jnp.zeros_like, params)

    @jax.jit
    def grads(params, stats, x, y):
        m = nnx.merge(graphdef, params, stats)

        def loss(m):
            logp = jax.nn.log_softmax(m(x))
            return -jnp.take_along_axis(logp, y[:, None], 1).sum() / global_batch

        lv, g = nnx.value_and_grad(loss)(m)
        return jnp.concatenate([ravel_pytree(g)[0], lv[None]]), nnx.state(m, nnx.BatchStat)

    @jax.jit
    def update(params, velocity, flat):
        g = ravel_pytree(params)[1](flat[:-1])
        velocity = jax.tree.map(lambda v, d: 0.9 * v + d, velocity, g)
        return jax.tree.map(lambda p, v: p - args.lr * v, params, velocity), velocity

    def step(x, y):
        nonlocal params, stats, velocity
        flat, stats = grads(params, stats, x, y)
        flat = np.array(flat, np.float64)  # a writable copy
        if sum_over_ranks:
            world.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
        params, velocity = update(params, velocity, jnp.asarray(flat, DTYPE))
        nnx.update(model, params, stats)
        return float(flat[-1])

    return step


def accuracy(model, x, y):
    model.eval()  # running statistics: no communication
    acc = float((jnp.argmax(model(jnp.asarray(x)), -1) == jnp.asarray(y)).mean())
    model.train()
    return acc


def main():
    (x_train, y_train), (x_test, y_test) = load_data()
    global_batch = args.per_rank * size
    mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)
    base = CNN(nnx.BatchNorm, nnx.Rngs(args.seed))  # the same initialization everywhere
    models = {"SyncBN": CNN(syncbn.flax.BatchNorm, nnx.Rngs(0)),
              "BN per rank": CNN(nnx.BatchNorm, nnx.Rngs(0))}
    if rank == 0:
        models["BN, one process, whole batch"] = CNN(nnx.BatchNorm, nnx.Rngs(0))
    for m in models.values():
        nnx.update(m, nnx.state(base))  # flax checkpoints load into syncbn's BatchNorm
    steps = {name: trainer(m, global_batch, name != "BN, one process, whole batch")
             for name, m in models.items()}
    losses = {name: [] for name in models}
    rng = np.random.default_rng(args.seed)
    per_epoch = len(y_train) // global_batch
    t0 = time.perf_counter()
    for s in range(args.steps):
        if s % per_epoch == 0:
            perm = rng.permutation(len(y_train))
        idx = perm[(s % per_epoch) * global_batch:(s % per_epoch + 1) * global_batch]
        xb, yb = x_train[idx], y_train[idx]
        for name, step in steps.items():
            whole = name == "BN, one process, whole batch"
            x, y = (xb, yb) if whole else (xb[mine], yb[mine])
            losses[name].append(step(jnp.asarray(x), jnp.asarray(y)))
    elapsed = time.perf_counter() - t0
    if rank != 0:
        return
    print(f"digits (JAX {jax.__version__}, flax): {len(y_train)} train / {len(y_test)} test "
          f"images, {size} rank(s) x {args.per_rank} images per step (global batch "
          f"{global_batch}), {args.steps} SGD steps, {args.dtype}, {elapsed:.1f} s")
    acc = {name: accuracy(m, x_test, y_test) for name, m in models.items()}
    for name in models:
        print(f"  test accuracy, {name:30s} {acc[name]:6.1%}   "
              f"(final loss, mean of the last 50 steps: {np.mean(losses[name][-50:]):.3f})")
    def max_diff(kind):
        a = nnx.state(models["SyncBN"], kind)
        b = nnx.state(models["BN, one process, whole batch"], kind)
        return max(float(jnp.abs(u - v).max())
                   for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))

    print(f"  SyncBN vs one process on the whole batch, after {args.steps} steps: max |param "
          f"diff| {max_diff(nnx.Param):.1e}, max |running-stat diff| "
          f"{max_diff(nnx.BatchStat):.1e} (flax keeps them in float32)")
    plot(losses, acc, global_batch)


def plot(losses, acc, global_batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"SyncBN": dict(color="C0", lw=2.5), "BN per rank": dict(color="C3", lw=1.5),
              "BN, one process, whole batch": dict(color="k", lw=1.2, ls="--")}
    w = min(20, len(next(iter(losses.values()))))  # per-step losses are noisy
    for name, ys in losses.items():
        ys = np.asarray(ys)
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(ys)), smooth,
                label=f"{name} (test accuracy {acc[name]:.1%})", **styles[name])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({w}-step moving average)")
    ax.set_title(f"Flax digits CNN, {size} ranks x {args.per_rank} images per rank "
                 f"(global batch {global_batch}), {args.dtype}")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"  loss curves saved to {args.out}")


if __name__ == "__main__":
    main()
