"""Synchronized batch norm over NumPy arrays, checked against plain batch norm.

Run it on 4 ranks (or any number, or none):

    .venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py examples/numpy_sync_bn.py
    .venv/bin/python examples/numpy_sync_bn.py

Every rank holds its own slice of one global batch, and the slices have different sizes.
SyncBatchNorm normalizes each slice with the mean and variance of the *whole* batch, so
the ranks together compute exactly what one process would on the concatenated batch.
This script runs a few training steps and then proves it: every rank rebuilds the global
batch from the shared seed, computes plain batch norm on it in float64, and compares.
"""

import sys

import numpy as np
from mpi4py import MPI

import syncbn

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()

C, H, W = 8, 5, 5  # channels and spatial size (NCHW)
STEPS, LR, SEED = 3, 0.1, 1234
MOMENTUM, EPS = 0.1, 1e-5

# Uneven split of the global batch: rank r holds 2 + r samples (2, 3, 4, 5 on 4 ranks).
sizes = [2 + r for r in range(size)]
offsets = np.concatenate([[0], np.cumsum(sizes)])
mine = slice(offsets[rank], offsets[rank + 1])  # this rank's rows of the global batch


def global_batch(step):
    """The step's whole batch (x, and dy as the loss would send back). Every rank can make
    it because it depends only on the seed; a real program would load only its slice."""
    rng = np.random.default_rng(SEED + step)
    shift = rng.uniform(-3, 3, (1, C, 1, 1))  # channels with different means and scales
    scale = rng.uniform(0.5, 2.0, (1, C, 1, 1))
    x = shift + scale * rng.standard_normal((sum(sizes), C, H, W))
    dy = rng.standard_normal(x.shape)
    return x, dy


def sum_over_ranks(a):
    """What a data-parallel optimizer does with parameter gradients: sum them."""
    out = np.empty(a.shape, np.float64)
    world.Allreduce(np.ascontiguousarray(a, np.float64), out, op=MPI.SUM)
    return out


# --- the reference: plain batch norm on the whole batch, float64 -----------------------
class ReferenceBatchNorm:
    def __init__(self):
        self.weight, self.bias = np.ones(C), np.zeros(C)
        self.running_mean, self.running_var = np.zeros(C), np.ones(C)

    def forward(self, x):
        n = x.size // C  # values per channel
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))  # biased variance
        self.xhat = (x - mean[:, None, None]) / np.sqrt(var + EPS)[:, None, None]
        self.invstd = 1 / np.sqrt(var + EPS)
        # PyTorch's convention: running_var takes the unbiased variance.
        self.running_mean = (1 - MOMENTUM) * self.running_mean + MOMENTUM * mean
        self.running_var = (1 - MOMENTUM) * self.running_var + MOMENTUM * var * n / (n - 1)
        return self.xhat * self.weight[:, None, None] + self.bias[:, None, None]

    def backward(self, dy):
        n = dy.size // C
        self.grad_bias = dy.sum(axis=(0, 2, 3))
        self.grad_weight = (dy * self.xhat).sum(axis=(0, 2, 3))
        k = (self.weight * self.invstd / n)[:, None, None]
        return k * (n * dy - self.grad_bias[:, None, None]
                    - self.xhat * self.grad_weight[:, None, None])


# --- training: each rank sees only its slice --------------------------------------------
# Under mpiexec the default communicator is MPI.COMM_WORLD; alone it is a world of one.
bn = syncbn.numpy.SyncBatchNorm(C)
ref = ReferenceBatchNorm()
errors = {}  # name -> worst |syncbn - reference| over steps (and ranks, below)


def track(name, got, want):
    errors[name] = max(errors.get(name, 0.0), float(np.max(np.abs(got - want))))


for step in range(STEPS):
    x, dy = global_batch(step)
    x_local = x[mine].astype(np.float32)  # the training data is float32
    dy_local = dy[mine].astype(np.float32)

    y_local = bn.forward(x_local)  # one all-reduce of 2C+1 numbers
    dx_local = bn.backward(dy_local)  # one all-reduce of 2C numbers
    grad_w, grad_b = sum_over_ranks(bn.grad_weight), sum_over_ranks(bn.grad_bias)

    y_ref, dx_ref = ref.forward(x), ref.backward(dy)
    track("y", y_local, y_ref[mine])
    track("dx", dx_local, dx_ref[mine])
    track("grad_weight (summed)", grad_w, ref.grad_weight)
    track("grad_bias (summed)", grad_b, ref.grad_bias)
    track("running_mean", bn.running_mean, ref.running_mean)
    track("running_var", bn.running_var, ref.running_var)

    # A plain SGD step; identical on every rank because the gradients were summed.
    bn.weight -= np.float32(LR) * grad_w.astype(np.float32)
    bn.bias -= np.float32(LR) * grad_b.astype(np.float32)
    ref.weight -= LR * ref.grad_weight
    ref.bias -= LR * ref.grad_bias

# --- verdict ---------------------------------------------------------------------------
# float32 arithmetic against a float64 reference: agree to float32 rounding, scaled by the
# size of what is compared (gradients are sums over the whole batch).
tolerance = {"y": 1e-4, "dx": 1e-4, "grad_weight (summed)": 1e-3, "grad_bias (summed)": 1e-3,
             "running_mean": 1e-5, "running_var": 1e-5}
worst = {k: world.allreduce(v, op=MPI.MAX) for k, v in errors.items()}
ok = all(worst[k] <= tolerance[k] for k in worst)
if rank == 0:
    print(f"{size} rank(s), per-rank batch sizes {sizes} (global {sum(sizes)}), C={C}, "
          f"{STEPS} training steps; max |syncbn - float64 reference|:")
    for k, v in worst.items():
        print(f"  {k:22s} {v:.2e}  (tolerance {tolerance[k]:.0e})")
    print("OK" if ok else "MISMATCH")
sys.exit(0 if ok else 1)
