"""One rank of the Keras equivalence test (tests/test_keras.py), torch backend.

Usage: mpiexec -n N python -m mpi4py keras_worker.py DATA.npz OUT_DIR

Part 1: a SyncBatchNormalization layer (axis=-1, Keras defaults) on this rank's slice for
3 training steps: outputs, input gradients and moving statistics.
Part 2: a small model trained with a custom loop (gradients summed across ranks with
mpi4py) for 3 SGD steps; its weights.
Part 3: masked statistics: layers with axis=-1 (a mask of positions) and axis=1 (the
mask varies along the channels: per-channel counts) called with ``mask=`` for 3 steps.
Saved to OUT_DIR/rank{r}.npz.
"""

import os
import sys

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from keras_model import make_model  # noqa: E402
from mpi4py import MPI  # noqa: E402

from syncbn.keras import SyncBatchNormalization  # noqa: E402


def main(data_path, out_dir):
    world = MPI.COMM_WORLD
    r = world.Get_rank()
    data = np.load(data_path)
    sizes = [int(s) for s in data["sizes"]]
    off, n = sum(sizes[:r]), sizes[r]
    out = {}

    layer = SyncBatchNormalization(axis=int(data["axis"]))  # comm: MPI.COMM_WORLD default
    for s in range(3):
        x = torch.tensor(data[f"x{s}"][off:off + n], requires_grad=True)
        y = layer(x, training=True)
        (y * torch.tensor(data[f"g{s}"][off:off + n])).sum().backward()
        out[f"y{s}"], out[f"dx{s}"] = y.detach().cpu().numpy(), x.grad.numpy()
    for w in layer.weights:
        out[f"layer_{w.name}"] = keras.ops.convert_to_numpy(w)
    out["infer"] = keras.ops.convert_to_numpy(layer(data["x0"][:4]))

    model = make_model()
    opt = keras.optimizers.SGD(learning_rate=0.1)
    for s in range(3):
        x = torch.tensor(data[f"mx{s}"][off:off + n])
        t = torch.tensor(data[f"mt{s}"][off:off + n])
        loss = ((model(x, training=True) - t) ** 2).sum() / sum(sizes)  # global mean
        model.zero_grad()
        loss.backward()
        grads = []
        for v in model.trainable_weights:
            g = v.value.grad.detach().cpu().clone().contiguous()  # Keras may run on a GPU
            world.Allreduce(MPI.IN_PLACE, g.numpy(), op=MPI.SUM)
            grads.append(g.to(v.value.device))
        opt.apply(grads, model.trainable_weights)
    for i, w in enumerate(model.weights):
        out[f"model_{i}_{w.name}"] = keras.ops.convert_to_numpy(w)

    for label, axis in (("mlast", -1), ("mfirst", 1)):
        layer = SyncBatchNormalization(axis=axis)
        for s in range(3):
            x = torch.tensor(data[f"x{s}"][off:off + n], requires_grad=True)
            y = layer(x, training=True, mask=torch.tensor(data[f"k{s}"][off:off + n]))
            (y * torch.tensor(data[f"g{s}"][off:off + n])).sum().backward()
            out[f"{label}_y{s}"], out[f"{label}_dx{s}"] = y.detach().numpy(), x.grad.numpy()
        for w in layer.weights:
            out[f"{label}_{w.name}"] = keras.ops.convert_to_numpy(w)
    np.savez(os.path.join(out_dir, f"rank{r}.npz"), **out)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
