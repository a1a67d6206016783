"""What masked statistics cost: against the unmasked call in the core, and against
flax's masked BatchNorm under jax.jit.

    .venv/bin/python benchmarks/bench_masks.py [--reps N] [--json PATH] [--no-jax]

1. fwd+bwd through the core's composed forward/backward (syncbn._core, float32 NCHW,
   weight, bias, running stats, local communicator, one process) three ways: no mask, a
   mask of positions (N, 1, H, W) and a mask of elements (N, C, H, W, per-channel
   counts); about 70 % of the elements counted.
2. a jitted value_and_grad of sum(y * g) for one layer, channels-last, a mask of positions
   (N, H, W, 1): syncbn.jax.batch_norm(mask=) against flax.nnx.BatchNorm(mask=).
Interleaved samples, ratios of medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from bench_fingerprint import calibrate, sample  # noqa: E402

import syncbn  # noqa: E402
from syncbn import _core  # noqa: E402

SHAPES = [(8, 512, 3, 3), (8, 256, 6, 6), (8, 64, 24, 24), (32, 64, 56, 56)]


def step_fn(shape, kind):
    N, C = shape[0], shape[1]
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    y, dx, gw, gb = (np.empty_like(x), np.empty_like(x), np.empty_like(w), np.empty_like(b))
    sm, si = np.empty(C), np.empty(C)
    mshape = {"none": None, "positions": (N, 1) + shape[2:], "elements": shape}[kind]
    mask = None if mshape is None else (rng.random(mshape) < 0.7).astype(np.float32)
    counts = np.empty(C) if kind == "elements" else None
    comm = syncbn.comm.local()

    def step():
        n = _core.forward(x, w, b, rm, rv, y, sm, si, True, 0.1, 1e-5, 1, comm, mask=mask,
                          counts=counts)
        _core.backward(dy, x, sm, si, w, dx, gw, gb, True, n, 1, comm, mask=mask,
                       counts=counts)

    return step


def jax_case(shape, reps):
    """(flax us, syncbn/flax) for one shape."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import syncbn.jax as sbj

    C = shape[-1]
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    m = jnp.asarray(rng.random(shape[:-1] + (1,)) < 0.7)
    bn = nnx.BatchNorm(C, momentum=0.9, rngs=nnx.Rngs(0))
    p, st = (bn.scale[...], bn.bias[...]), (bn.mean[...], bn.var[...])

    @jax.jit
    def ours(p, x):
        def loss(p, x):
            y, _ = sbj.batch_norm(x, p[0], p[1], st, momentum=0.9, mask=m)
            return (y * g).sum()
        return jax.value_and_grad(loss, argnums=(0, 1))(p, x)

    @nnx.jit
    def theirs(bn, x):
        def loss(bn, x):
            return (bn(x, mask=m) * g).sum()
        return nnx.value_and_grad(loss, argnums=(0, 1))(bn, x)

    fns = {"syncbn": lambda: jax.block_until_ready(ours(p, x)),
           "flax": lambda: jax.block_until_ready(theirs(bn, x))}
    for f in fns.values():
        f()
    n = calibrate(fns["flax"])
    t = {k: [] for k in fns}
    for r in range(reps + 2):
        for k in (("syncbn", "flax") if r % 2 else ("flax", "syncbn")):
            s = sample(fns[k], n)
            if r >= 2:
                t[k].append(s)
    med = {k: statistics.median(v) for k, v in t.items()}
    return med["flax"] * 1e6, med["syncbn"] / med["flax"]


def jax_part(reps):
    print(f"{'jax, NHWC':18s} {'flax us':>9s} {'syncbn/flax':>12s}")
    res = {}
    for shape in [(8, 3, 3, 512), (8, 24, 24, 64), (32, 56, 56, 64)]:
        us, ratio = jax_case(shape, reps)
        res[str(shape)] = {"flax_us": us, "syncbn/flax": ratio}
        print(f"{str(shape):18s} {us:9.0f} {ratio:12.2f}", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--no-jax", action="store_true")
    args = ap.parse_args()
    kinds = ("none", "positions", "elements")
    out = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                    "host": platform.node(), "cpus": os.cpu_count(), "argv": sys.argv,
                    "threads": syncbn.build_info()["threads"]}}
    print(f"{'shape':18s} {'none us':>9s} {'positions/none':>15s} {'elements/none':>14s}")
    for shape in SHAPES:
        fns = {k: step_fn(shape, k) for k in kinds}
        n = calibrate(fns["none"])
        t = {k: [] for k in kinds}
        for r in range(args.reps + 2):
            order = kinds if r % 2 else kinds[::-1]
            for k in order:
                s = sample(fns[k], n)
                if r >= 2:
                    t[k].append(s)
        med = {k: statistics.median(v) for k, v in t.items()}
        res = {"none_us": med["none"] * 1e6,
               "positions/none": med["positions"] / med["none"],
               "elements/none": med["elements"] / med["none"]}
        out[str(shape)] = res
        print(f"{str(shape):18s} {res['none_us']:9.0f} {res['positions/none']:15.2f} "
              f"{res['elements/none']:14.2f}", flush=True)
    if not args.no_jax:
        out["jax"] = jax_part(args.reps)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
