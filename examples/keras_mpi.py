"""Keras 3 (torch backend) with SyncBatchNormalization across MPI ranks.

    .venv/bin/mpiexec -n 2 .venv/bin/python -m mpi4py examples/keras_mpi.py

Every rank trains the same small model on its own slice of each global batch (uneven
slices); SyncBatchNormalization normalizes with the statistics of the whole batch, and
gradients are summed across ranks with mpi4py, so all ranks stay identical. At the end
rank 0 checks the result against the same model with keras.layers.BatchNormalization
trained in one process on the concatenated batches.
"""

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import keras  # noqa: E402
import numpy as np  # noqa: E402
from mpi4py import MPI  # noqa: E402

from syncbn.keras import SyncBatchNormalization  # noqa: E402

world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()
sizes = [3 + r % 2 for r in range(size)]  # uneven slices: 3, 4, 3, 4, ...
offset, total = sum(sizes[:rank]), sum(sizes)
STEPS, LR = 5, 0.05


def make_model(norm):
    keras.utils.set_random_seed(0)  # the same initial weights everywhere
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(8, 3, padding="same"),
        norm(),  # channels-last: axis=-1, momentum=0.99, epsilon=1e-3
        keras.layers.ReLU(),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])


def batch(step):
    """The step's global batch; each rank would normally load only its slice."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((total, 8, 8, 3)).astype("float32") * 2 + 1
    y = rng.standard_normal((total, 4)).astype("float32")
    # On Keras' device (a GPU when there is one).
    return keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(y)


def train(model, step_data, allreduce):
    opt = keras.optimizers.SGD(learning_rate=LR)
    for step in range(STEPS):
        x, y = step_data(step)
        loss = ((model(x, training=True) - y) ** 2).sum() / total  # global mean
        model.zero_grad()
        loss.backward()
        grads = [v.value.grad.detach().clone().contiguous() for v in model.trainable_weights]
        for g in grads:
            allreduce(g)
        opt.apply(grads, model.trainable_weights)
    return model


def sum_over_ranks(g):
    h = g.cpu()  # MPI sums host memory here; Keras may be running on a GPU
    world.Allreduce(MPI.IN_PLACE, h.numpy(), op=MPI.SUM)
    g.copy_(h)


# comm defaults to MPI.COMM_WORLD under mpiexec.
synced = train(make_model(SyncBatchNormalization),
               lambda s: tuple(t[offset:offset + sizes[rank]] for t in batch(s)),
               sum_over_ranks)

if rank == 0:
    reference = train(make_model(keras.layers.BatchNormalization), batch, lambda g: None)
    diff = max(float(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)).max())
               for a, b in zip(synced.weights, reference.weights, strict=True))
    print(f"{size} ranks, slices {sizes}: max |weight - single-process reference| = {diff:.2e}")
    print("OK" if diff < 1e-4 else "MISMATCH")
    raise SystemExit(0 if diff < 1e-4 else 1)
