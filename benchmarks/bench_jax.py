"""Per-step cost of a small Flax CNN with syncbn's BatchNorm against flax's BatchNorm, in
one process (comm: a world of one), in the same run.

    .venv/bin/python benchmarks/bench_jax.py [--reps 15] [--steps 20]

One training step is a jax.jit-compiled value_and_grad of the loss plus an SGD update
(parameters and batch statistics in, new ones out), the same for both models except the
BatchNorm class. The two models alternate in each repetition (their order flips every
time), each repetition times `steps` steps after a warm-up, and the medians over the
repetitions and their ratio are printed: the machine may be shared and noisy, so only the
ratio of figures taken side by side means much.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import syncbn
import syncbn.flax


class CNN(nnx.Module):
    def __init__(self, bn, width, rngs):
        self.c1 = nnx.Conv(3, width, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = bn(width, rngs=rngs)
        self.c2 = nnx.Conv(width, 2 * width, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = bn(2 * width, rngs=rngs)
        self.fc = nnx.Linear(2 * width, 10, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn1(self.c1(x)))
        x = nnx.relu(self.bn2(self.c2(x)))
        return self.fc(x.mean(axis=(1, 2)))


def make_step(model):
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)

    @jax.jit
    def step(params, stats, x, y):
        m = nnx.merge(graphdef, params, stats)

        def loss(m):
            logp = jax.nn.log_softmax(m(x))
            return -jnp.take_along_axis(logp, y[:, None], 1).mean()

        _, g = nnx.value_and_grad(loss)(m)
        params = jax.tree.map(lambda p, d: p - 0.01 * d, nnx.state(m, nnx.Param), g)
        return params, nnx.state(m, nnx.BatchStat)

    state = [params, stats]

    def run(x, y, n):
        for _ in range(n):
            state[0], state[1] = step(state[0], state[1], x, y)
        jax.block_until_ready(state)

    return run


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20)
    args = ap.parse_args()
    print(f"jax {jax.__version__}, flax {__import__('flax').__version__}, "
          f"syncbn {syncbn.__version__}, "
          f"{platform.machine()} {os.cpu_count()} CPUs, backend {jax.default_backend()}")
    configs = [("batch 32, 16x16x3, width 16", 32, 16, 16),
               ("batch 8, 32x32x3, width 32", 8, 32, 32),
               ("batch 128, 8x8x3, width 8", 128, 8, 8)]
    rng = np.random.default_rng(0)
    print(f"{'config':30s} {'flax ms/step':>13s} {'syncbn ms/step':>15s} {'ratio':>7s}")
    for label, n, hw, width in configs:
        x = jnp.asarray(rng.standard_normal((n, hw, hw, 3)), jnp.float32)
        y = jnp.asarray(rng.integers(0, 10, n))
        runs = {"flax": make_step(CNN(nnx.BatchNorm, width, nnx.Rngs(0))),
                "syncbn": make_step(CNN(syncbn.flax.BatchNorm, width, nnx.Rngs(0)))}
        for run in runs.values():
            run(x, y, 3)  # compile, warm up
        times = {k: [] for k in runs}
        ratios = []
        for rep in range(args.reps):
            order = list(runs) if rep % 2 == 0 else list(runs)[::-1]
            t = {}
            for k in order:
                t0 = time.perf_counter()
                runs[k](x, y, args.steps)
                t[k] = (time.perf_counter() - t0) / args.steps
                times[k].append(t[k])
            ratios.append(t["syncbn"] / t["flax"])
        f, s = statistics.median(times["flax"]), statistics.median(times["syncbn"])
        print(f"{label:30s} {1e3 * f:13.3f} {1e3 * s:15.3f} {statistics.median(ratios):7.2f}")
    print("ratio: median over repetitions of syncbn/flax taken side by side")


if __name__ == "__main__":
    main()
