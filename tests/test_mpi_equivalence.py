"""Equivalence under real mpiexec (2, 3, 4 ranks): for any split of a global batch,
y, dx, the rank-sum of grad_weight / grad_bias, running_mean and running_var equal a
float64 batch norm on the concatenated batch (DESIGN.md, "Equivalence")."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest

from conftest import WORKERS, run_mpi

EPS = 1e-5

# name -> case. `sizes` is a per-rank pattern (repeated/cut to the world size), `tail` the
# per-sample shape with the channel at `axis` (counted on the full shape).
CASES = {
    "nchw-uneven": dict(sizes=[3, 0, 5, 2], tail=(3, 5, 4), axis=1),
    "nhwc-axis-last": dict(sizes=[2, 4, 1, 3], tail=(5, 4, 3), axis=-1),
    "channels-last-memory-dy-contiguous": dict(sizes=[4, 1, 0, 2], tail=(3, 5, 4), axis=1,
                                               layout="channels_last", dy_layout="contiguous"),
    "2d": dict(sizes=[2, 3, 1, 4], tail=(6,), axis=1),
    "3d": dict(sizes=[2, 0, 3, 1], tail=(4, 7), axis=1),
    "5d-channels-last": dict(sizes=[1, 2, 2, 1], tail=(3, 2, 3, 4), axis=1,
                             layout="channels_last"),
    "middle-axis": dict(sizes=[2, 1, 3, 2], tail=(4, 3, 5), axis=2),
    "strided-x-fortran-dy": dict(sizes=[3, 2, 0, 4], tail=(3, 4, 6), axis=1,
                                 layout="strided", dy_layout="fortran"),
    "one-sample-per-rank": dict(sizes=[1], tail=(3, 4), axis=1),
    "all-ranks-empty": dict(sizes=[0], tail=(3, 4), axis=1, steps=1),
    "float16-count-over-65504": dict(sizes=[3, 3, 1, 1], tail=(2, 12000), axis=1,
                                     dtype="float16", steps=2),
    "bfloat16-torch": dict(sizes=[2, 1, 3, 0], tail=(3, 6, 5), axis=1, dtype="bfloat16"),
    "torch-channels-last": dict(sizes=[2, 3, 0, 1], tail=(3, 5, 4), axis=1,
                                layout="torch_channels_last"),
    "large-channel-offset": dict(sizes=[3, 2, 4, 1], tail=(3, 50), axis=1, offset=1e4),
    "constant-channel": dict(sizes=[2, 0, 3, 1], tail=(3, 5), axis=1, constant_channel=1),
    "float64": dict(sizes=[3, 1, 2, 2], tail=(4, 5), axis=1, dtype="float64"),
    "momentum-0.5": dict(sizes=[1, 4, 2, 3], tail=(2, 5), axis=1, momentum=0.5, steps=4),
    "no-affine": dict(sizes=[2, 2, 3, 0], tail=(3, 4), axis=1, affine=False),
    "counting-communicator": dict(sizes=[2, 0, 3, 1], tail=(5, 3), axis=1, comm="counting"),
    "mpi-split-subgroups": dict(sizes=[2, 3, 1, 2], tail=(3, 4), axis=1, comm="split"),
    "syncbn-comm-split": dict(sizes=[1, 0, 3, 2], tail=(3, 4), axis=1, comm="syncbn_split"),
    # Over 1 MiB of x and dy per rank in rows of 67 channels: the backward reduction runs
    # along the rows (core/src/cpu/traverse.h, reduce_rows), with a tail of 3 per row.
    "large-nhwc-rows-walk": dict(sizes=[6, 0, 8, 5], tail=(20, 20, 67), axis=-1, steps=2),
}

# Tolerances relative to max(1, |ref|): output rounding of the dtype dominates.
TOL = {"float64": 1e-10, "float32": 3e-5, "float16": 4e-3, "bfloat16": 3e-2}


def make_data(name, case, nranks, path):
    rng = np.random.default_rng(zlib.crc32(f"{name}/{nranks}".encode()))
    sizes = (case["sizes"] * nranks)[:nranks]
    C = case["tail"][case["axis"] - 1] if case["axis"] > 0 else case["tail"][case["axis"]]
    stat_shape = [1] * (len(case["tail"]) + 1)
    stat_shape[case["axis"]] = C
    arrays = {}
    for s in range(case.get("steps", 3)):
        shape = (sum(sizes), *case["tail"])
        scale = rng.uniform(0.5, 2.0, C).reshape(stat_shape)
        center = rng.uniform(-1, 1, C).reshape(stat_shape)
        if "offset" in case:  # channel means offset/std = 1e4 times their std
            center = case["offset"] * scale
        x = center + scale * rng.standard_normal(shape)
        if "constant_channel" in case:
            idx = [slice(None)] * x.ndim
            idx[case["axis"]] = case["constant_channel"]
            x[tuple(idx)] = 3.0
        arrays[f"x{s}"] = x
        arrays[f"dy{s}"] = rng.standard_normal(shape)
    arrays["weight"] = rng.uniform(0.5, 1.5, C)
    arrays["bias"] = rng.uniform(-0.5, 0.5, C)
    np.savez(path, **arrays)
    return sizes, arrays


def reference_step(x, dy, w, b, axis):
    """float64 batch norm forward/backward on the concatenated batch."""
    red = tuple(d for d in range(x.ndim) if d != axis % x.ndim)
    shp = [1] * x.ndim
    shp[axis] = -1
    n = x.size // x.shape[axis]
    mean = x.mean(axis=red)
    var = ((x - mean.reshape(shp)) ** 2).mean(axis=red)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean.reshape(shp)) * invstd.reshape(shp)
    y = xhat * w.reshape(shp) + b.reshape(shp)
    db = dy.sum(axis=red)
    dw = (dy * xhat).sum(axis=red)
    dx = (w * invstd).reshape(shp) * (dy - (db / n).reshape(shp) - xhat * (dw / n).reshape(shp))
    return dict(y=y, dx=dx, dw=dw, db=db, mean=mean, var_unbiased=var * n / max(n - 1, 1), n=n)


def close(got, ref, tol, what):
    scale = np.maximum(1.0, np.abs(ref))
    err = np.abs(got - ref) / scale
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    assert err.size == 0 or err.max() <= tol, f"{what}: max rel err {err.max():.3g} > {tol:g}"


@pytest.mark.parametrize("nranks", [2, 3, 4])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_batch_norm_on_global_batch(name, nranks, tmp_path):
    case = dict(CASES[name])
    case.setdefault("dtype", "float32")
    case.setdefault("layout", "contiguous")
    case.setdefault("steps", 3)
    case.setdefault("momentum", 0.1)
    case["eps"] = EPS
    sizes, data = make_data(name, case, nranks, tmp_path / "data.npz")
    case.update(sizes=sizes, data=str(tmp_path / "data.npz"))
    (tmp_path / "case.json").write_text(json.dumps(case))
    run_mpi(nranks, WORKERS / "equivalence.py", tmp_path / "case.json", tmp_path)
    res = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(nranks)]

    axis, tol, C = case["axis"], TOL[case["dtype"]], len(data["weight"])
    groups = [[r for r in range(nranks) if r % 2 == g] for g in (0, 1)] \
        if case.get("comm") in ("split", "syncbn_split") else [list(range(nranks))]
    w = data["weight"] if case.get("affine", True) else np.ones(C)
    b = data["bias"] if case.get("affine", True) else np.zeros(C)

    for ranks in groups:
        if not ranks:
            continue
        total = sum(sizes[r] for r in ranks)
        if total == 1 and np.prod(case["tail"]) // C == 1:
            # A global count of 1 per channel: every rank raises, nobody hangs.
            for r in ranks:
                assert "error" in res[r], f"rank {r} did not raise"
                assert "more than 1 value per channel" in str(res[r]["error"])
                np.testing.assert_array_equal(res[r]["running_mean"], np.zeros(C))
            continue
        rm, rv = np.zeros(C), np.ones(C)
        for s in range(case["steps"]):
            x = np.concatenate([res[r][f"xin{s}"] for r in ranks])
            dy = np.concatenate([res[r][f"dyin{s}"] for r in ranks])
            offs = np.cumsum([0] + [sizes[r] for r in ranks])
            if total == 0:  # all ranks empty: empty outputs, zero grads, stats untouched
                for r in ranks:
                    assert res[r][f"y{s}"].size == 0 and res[r][f"dx{s}"].size == 0
                    if case.get("affine", True):
                        np.testing.assert_array_equal(res[r][f"dw{s}"], 0)
                continue
            ref = reference_step(x, dy, w, b, axis)
            for i, r in enumerate(ranks):
                sl = slice(offs[i], offs[i + 1])
                close(res[r][f"y{s}"], ref["y"][sl], tol, f"rank {r} step {s} y")
                close(res[r][f"dx{s}"], ref["dx"][sl], tol, f"rank {r} step {s} dx")
                if case["layout"] != "strided":  # dense inputs keep their memory layout
                    assert bool(res[r][f"same_strides{s}"]), f"rank {r}: output layout differs"
            if case.get("affine", True):
                gtol = 1e-10 if case["dtype"] == "float64" else 2e-5
                close(sum(res[r][f"dw{s}"] for r in ranks), ref["dw"], gtol * np.sqrt(total),
                      f"step {s} sum of grad_weight")
                close(sum(res[r][f"db{s}"] for r in ranks), ref["db"], gtol * np.sqrt(total),
                      f"step {s} sum of grad_bias")
            m = case["momentum"]
            rm = (1 - m) * rm + m * ref["mean"]
            rv = (1 - m) * rv + m * ref["var_unbiased"]
            if case.get("comm") == "counting":
                for r in ranks:
                    # O(C), independent of W: sums, count, 16 fingerprint slots.
                    assert list(res[r][f"fwd_payloads{s}"]) == [2 * C + 1 + 16]
                    assert list(res[r][f"bwd_payloads{s}"]) == [2 * C + 1 + 16]
        stol = 1e-12 if case["dtype"] == "float64" else 2e-6
        for r in ranks:
            close(res[r]["running_mean"], rm, stol * (1 + case.get("offset", 0)),
                  f"rank {r} running_mean")
            close(res[r]["running_var"], rv, stol, f"rank {r} running_var")
