"""Train a small CNN with a tiny per-rank batch three ways, and see what SyncBN buys.

    .venv/bin/pip install -e '.[torch,examples]'  # + scikit-learn (the data), matplotlib
    .venv/bin/mpiexec -n 4 .venv/bin/python -m mpi4py examples/train_digits.py
    .venv/bin/python examples/train_digits.py     # one process works too

The data is scikit-learn's bundled digits set (1797 8x8 images, no download); the model
two 3x3 convolutions with BatchNorm2d, then a hidden layer with BatchNorm1d, which sees
one value per image and channel: per-rank statistics of 4 images are as noisy as batch
statistics get. Every rank holds 4 images of each global batch. From the same
initialization and the same sample order, the script trains

  1. SyncBN: the model after syncbn.torch.convert_sync_batchnorm, so every batch norm
     normalizes with the statistics of the global batch (all ranks together);
  2. plain BN per rank: each rank normalizes with the statistics of its own 4 images,
     gradients still summed across ranks (data parallelism without SyncBN);
  3. one process, plain BN, on the whole global batch (rank 0 only): the reference.

Every rank's loss is the summed cross-entropy of its images divided by the global batch
size, so the gradients summed over ranks are those of the mean loss on the global batch,
and 1 must follow 3 step for step: rank 0 prints the largest parameter difference between
them, the test accuracy of all three (eval mode, running statistics) and saves their loss
curves to examples/train_digits_loss.png (--out to change).

It computes in float64 so that 1 and 3 stay equal to rounding (~1e-14) for the whole run.
In float32 they agree to ~1e-7 after one step (the one process sums in another order),
and training amplifies that to ~1e-1 by step 300, as much as it separates two plain
torch float32 runs whose parameters start one ulp apart. With one rank the three are the same
computation; a global batch of only 4 trains chaotically, so even in float64 rounding
differences grow over the run there.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

# One thread per rank: the ranks already fill the cores, and oversubscribed OpenMP or MKL
# threads that spin while waiting make a tiny model crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SYNCBN_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import syncbn.torch  # noqa: E402

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "train_digits_loss.png"),
                    help="where to save the loss curves (PNG)")
    ap.add_argument("--per-rank", type=int, default=4, help="images per rank and step")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float64",
                    help="float64 (default) keeps SyncBN and the one-process reference equal "
                    "to ~1e-14 for the whole run; in float32 they start ~1e-7 apart (sums in "
                    "a different order) and training amplifies that to ~1e-1 by step 300")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args()


def load_data(dtype):
    """Digits as (N, 1, 8, 8) in [0, 1]; a fixed 80/20 split, the same on every rank."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=dtype).unsqueeze(1)
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.default_rng(1234).permutation(len(y)))
    n_test = len(y) // 5
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def make_model(dtype):
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 16, 3, padding=1, bias=False), torch.nn.BatchNorm2d(16),
        torch.nn.ReLU(),
        torch.nn.Conv2d(16, 32, 3, padding=1, bias=False), torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),  # 8x8 -> 4x4
        torch.nn.Flatten(),
        # BatchNorm1d sees one value per image and channel: per-rank statistics of 4
        # images are as noisy as batch statistics get.
        torch.nn.Linear(32 * 4 * 4, 64, bias=False), torch.nn.BatchNorm1d(64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    ).to(dtype)


def batches(n, global_batch, steps, seed):
    """Indices of each step's global batch: a fresh permutation per epoch, drop the rest."""
    rng = np.random.default_rng(seed)
    per_epoch = n // global_batch
    for step in range(steps):
        if step % per_epoch == 0:
            perm = torch.from_numpy(rng.permutation(n))
        k = step % per_epoch
        yield perm[k * global_batch:(k + 1) * global_batch]


def sum_grads_over_ranks(model, loss):
    """What DDP does, in one all-reduce: sums every parameter gradient (and the loss, for
    the plot) across ranks."""
    params = [p for p in model.parameters()]
    flat = torch.cat([p.grad.reshape(-1) for p in params] + [loss.detach().reshape(1)])
    buf = flat.to(torch.float64).numpy()
    world.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    flat = torch.from_numpy(buf)
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p.grad))
        i += p.numel()
    return float(flat[-1])


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    acc = (model(x).argmax(1) == y).double().mean().item()
    model.train()
    return acc


def main():
    args = parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)  # the same initialization on every rank
    (x_train, y_train), (x_test, y_test) = load_data(dtype)
    global_batch = args.per_rank * size
    mine = slice(rank * args.per_rank, (rank + 1) * args.per_rank)

    base = make_model(dtype)
    models = {
        "SyncBN": syncbn.torch.convert_sync_batchnorm(copy.deepcopy(base)),
        "BN per rank": copy.deepcopy(base),
    }
    if rank == 0:
        models["BN, one process, whole batch"] = copy.deepcopy(base)
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9)
            for k, m in models.items()}
    losses = {k: [] for k in models}
    cross_entropy = torch.nn.functional.cross_entropy

    t0 = time.perf_counter()
    for idx in batches(len(y_train), global_batch, args.steps, args.seed):
        xb, yb = x_train[idx], y_train[idx]
        for name, model in models.items():
            opts[name].zero_grad()
            if name == "BN, one process, whole batch":  # the whole global batch, no comm
                loss = cross_entropy(model(xb), yb, reduction="sum") / global_batch
                loss.backward()
                losses[name].append(loss.item())
            else:  # this rank's slice; the sum over ranks is the global mean loss
                xr, yr = xb[mine], yb[mine]
                loss = cross_entropy(model(xr), yr, reduction="sum") / global_batch
                loss.backward()
                losses[name].append(sum_grads_over_ranks(model, loss))
            opts[name].step()
    elapsed = time.perf_counter() - t0

    if rank != 0:
        return
    print(f"digits: {len(y_train)} train / {len(y_test)} test images, {size} rank(s) x "
          f"{args.per_rank} images per step (global batch {global_batch}), {args.steps} SGD "
          f"steps, {args.dtype}, {elapsed:.1f} s")
    acc = {name: accuracy(model, x_test, y_test) for name, model in models.items()}
    for name in models:
        print(f"  test accuracy, {name:30s} {acc[name]:6.1%}   "
              f"(final loss, mean of the last 50 steps: {np.mean(losses[name][-50:]):.3f})")
    print("  (BN per rank is evaluated with rank 0's running statistics, as DDP's "
          "broadcast_buffers would do)")
    sync, ref = models["SyncBN"], models["BN, one process, whole batch"]
    p_diff = max((a - b).abs().max().item()
                 for a, b in zip(sync.parameters(), ref.parameters(), strict=True))
    b_diff = max((a.double() - b.double()).abs().max().item()
                 for a, b in zip(sync.buffers(), ref.buffers(), strict=True))
    print(f"  SyncBN vs one process on the whole batch, after {args.steps} steps: max |param "
          f"diff| {p_diff:.1e}, max |running-stat diff| {b_diff:.1e}")
    if size == 1:
        print("  (one rank: the three are the same computation; a global batch of 4 trains "
              "chaotically, so rounding differences grow over the run)")
    plot(losses, acc, args, global_batch)


def plot(losses, acc, args, global_batch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    styles = {"SyncBN": dict(color="C0", lw=2.5),
              "BN per rank": dict(color="C3", lw=1.5),
              "BN, one process, whole batch": dict(color="k", lw=1.2, ls="--")}
    w = min(20, len(next(iter(losses.values()))))  # per-step losses are noisy
    for name, ys in losses.items():
        ys = np.asarray(ys)
        smooth = np.convolve(ys, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(ys)), smooth, label=f"{name} (test accuracy {acc[name]:.1%})",
                **styles[name])
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss ({w}-step moving average)")
    ax.set_title(f"digits CNN, {size} ranks x {args.per_rank} images per rank "
                 f"(global batch {global_batch}), {args.dtype}")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"  loss curves saved to {args.out}")


if __name__ == "__main__":
    main()
