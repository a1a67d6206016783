"""syncbn.keras.SyncBatchNormalization on Keras' torch backend (DESIGN.md: Keras
conventions; equivalence with keras.layers.BatchNormalization on the global batch)."""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "torch")
# The CPU tests (and the mpiexec workers, which inherit this) run Keras on the CPU even on
# a GPU machine; test_on_cuda_equals_keras_batchnormalization covers the GPU.
os.environ.setdefault("KERAS_TORCH_DEVICE", "cpu")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import syncbn  # noqa: E402
from syncbn.keras import SyncBatchNormalization, _check_backend  # noqa: E402

from conftest import WORKERS, run_mpi  # noqa: E402

sys.path.insert(0, str(WORKERS))
from keras_model import make_model  # noqa: E402

assert keras.backend.backend() == "torch", "these tests run Keras on its torch backend"


def np_(t):
    return keras.ops.convert_to_numpy(t)


def test_weights_are_named_and_ordered_like_keras_batchnormalization():
    ours, ref = SyncBatchNormalization(), keras.layers.BatchNormalization()
    ours.build((2, 3, 5)), ref.build((2, 3, 5))
    assert [w.name for w in ours.weights] == [w.name for w in ref.weights] == \
        ["gamma", "beta", "moving_mean", "moving_variance"]
    assert [w.trainable for w in ours.weights] == [w.trainable for w in ref.weights]


@pytest.mark.parametrize("axis,shape", [(-1, (8, 5, 5, 3)), (1, (8, 3, 5, 5)), (1, (8, 4)),
                                        (-2, (6, 3, 2)), (2, (4, 2, 3, 2, 2))])
def test_world_size_one_equals_keras_batchnormalization(axis, shape):
    rng = np.random.default_rng(0)
    ours = SyncBatchNormalization(axis=axis, momentum=0.9, gamma_initializer="random_uniform")
    ref = keras.layers.BatchNormalization(axis=axis, momentum=0.9)
    ours.build(shape), ref.build(shape)
    ref.set_weights(ours.get_weights())  # weights transfer (and gamma is not all ones)
    for _ in range(3):
        x = (rng.standard_normal(shape) * 2 + 3).astype("float32")
        xo, xr = torch.tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
        yo, yr = ours(xo, training=True), ref(xr, training=True)
        np.testing.assert_allclose(np_(yo), np_(yr), rtol=1e-5, atol=2e-5)
        g = torch.tensor(rng.standard_normal(shape).astype("float32"))
        (yo * g).sum().backward(), (yr * g).sum().backward()
        np.testing.assert_allclose(xo.grad.numpy(), xr.grad.numpy(), rtol=1e-4, atol=1e-4)
        for vo, vr in zip(ours.trainable_weights, ref.trainable_weights, strict=True):
            np.testing.assert_allclose(vo.value.grad.cpu().numpy(), vr.value.grad.cpu().numpy(),
                                       rtol=1e-4, atol=1e-4)
    for wo, wr in zip(ours.weights, ref.weights, strict=True):  # moving stats: biased var
        np.testing.assert_allclose(np_(wo), np_(wr), rtol=1e-5, atol=1e-6, err_msg=wo.name)
    x = rng.standard_normal(shape).astype("float32")
    np.testing.assert_allclose(np_(ours(x)), np_(ref(x)), rtol=1e-5, atol=2e-5)


def test_weights_transfer_both_ways():
    ref = keras.layers.BatchNormalization()
    ref.build((4, 3))
    ref.set_weights([np.arange(3.0) + k for k in range(4)])
    ours = SyncBatchNormalization()
    ours.build((4, 3))
    ours.set_weights(ref.get_weights())
    back = keras.layers.BatchNormalization()
    back.build((4, 3))
    back.set_weights(ours.get_weights())
    for a, b in zip(back.get_weights(), ref.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_training_none_follows_the_learning_phase_and_trainable_false_is_inference():
    x = np.random.default_rng(1).standard_normal((6, 3)).astype("float32") * 3 + 5
    layer = SyncBatchNormalization()
    inference = np_(layer(x))  # training=None outside fit: inference, moving stats
    np.testing.assert_allclose(inference, x / np.sqrt(1 + 1e-3), rtol=1e-5)
    np.testing.assert_allclose(np_(layer.moving_mean), 0)
    model = keras.Sequential([keras.Input((3,)), layer])
    model.compile("sgd", "mse")
    model.fit(x, np.zeros_like(x), epochs=1, batch_size=6, verbose=0)  # training=True
    assert np.all(np_(layer.moving_mean) != 0)
    frozen = np_(layer.moving_mean).copy()
    layer.trainable = False
    out = np_(layer(x, training=True))  # frozen: inference mode, stats untouched
    np.testing.assert_array_equal(np_(layer.moving_mean), frozen)
    mv = np_(layer.moving_variance)
    np.testing.assert_allclose(out, (x - frozen) / np.sqrt(mv + 1e-3) * np_(layer.gamma)
                               + np_(layer.beta), rtol=1e-5, atol=1e-5)


def test_list_axis_normalizes_per_pair_of_channels_with_tf_keras_shapes():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((7, 3, 4, 5)) * 2 + 1).astype("float32")
    layer = SyncBatchNormalization(axis=[1, -1], momentum=0.5)
    y = np_(layer(x, training=True))
    assert [tuple(w.shape) for w in layer.weights] == [(1, 3, 1, 5)] * 4
    xd = x.astype(np.float64)
    mean, var = xd.mean(axis=(0, 2), keepdims=True), xd.var(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(y, (xd - mean) / np.sqrt(var + 1e-3), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np_(layer.moving_mean), 0.5 * mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np_(layer.moving_variance), 0.5 + 0.5 * var, rtol=1e-5)


def test_config_and_keras_file_round_trip(tmp_path):
    layer = SyncBatchNormalization(axis=[1, 2], momentum=0.8, epsilon=1e-2, center=False,
                                   gamma_regularizer="l2", beta_constraint="non_neg")
    config = layer.get_config()
    assert config["axis"] == [1, 2] and config["momentum"] == 0.8 and not config["center"]
    assert "synchronized" not in config and "renorm" not in config
    again = SyncBatchNormalization.from_config(config)
    assert again.get_config() == config

    model = make_model()
    x = np.random.default_rng(3).standard_normal((5, 6, 6, 2)).astype("float32")
    model.compile("sgd", "mse")
    model.fit(x, np.zeros((5, 2)), epochs=1, verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.layers[1], SyncBatchNormalization)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    for a, b in zip(loaded.weights, model.weights, strict=True):
        np.testing.assert_array_equal(np_(a), np_(b))


def test_mixed_precision_float16_inputs_give_the_compute_dtype():
    layer = SyncBatchNormalization(dtype="mixed_float16")
    x = torch.tensor(np.random.default_rng(4).standard_normal((8, 3)) * 4 + 2,
                     dtype=torch.float16)
    y = layer(x, training=True)
    assert y.dtype == torch.float16 and layer.moving_mean.dtype == "float32"
    xd = x.double().numpy()
    ref = (xd - xd.mean(0)) / np.sqrt(xd.var(0) + 1e-3)
    np.testing.assert_allclose(y.detach().double().cpu().numpy(), ref, atol=4e-3 * 4)


def test_other_backends_get_a_clear_error():
    with pytest.raises(RuntimeError, match=r"BatchNormalization\(synchronized=True\)"):
        _check_backend("tensorflow")
    with pytest.raises(NotImplementedError, match="'numpy' Keras backend"):
        _check_backend("numpy")
    _check_backend("torch")
    _check_backend("jax")  # through syncbn.jax (tests/test_jax.py runs it)


def test_renorm_raises_instead_of_being_ignored():
    with pytest.raises(ValueError, match="^renorm, renorm_clipping: batch renormalization is "
                                         "not supported"):
        SyncBatchNormalization(renorm=True)
    with pytest.raises(ValueError, match="^renorm"):
        SyncBatchNormalization(renorm_clipping={"rmax": 2.0})
    # A keras.layers.BatchNormalization config (renorm=False, synchronized=False) loads.
    config = keras.layers.BatchNormalization(momentum=0.9).get_config()
    layer = SyncBatchNormalization.from_config(config)
    assert layer.momentum == 0.9


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(axis=1.5), TypeError, "^axis: expected an int"),
    (dict(axis=[1, 1]), ValueError, "^axis: expected distinct axes"),
    (dict(momentum=1.5), ValueError, "^momentum: expected"),
    (dict(epsilon=0.0), ValueError, "^epsilon: expected"),
    (dict(epsilon=float("inf")), ValueError, "^epsilon: expected a finite float > 0, got inf"),
    (dict(epsilon=float("nan")), ValueError, "^epsilon: expected a finite float > 0"),
])
def test_bad_arguments_are_named(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SyncBatchNormalization(**kwargs)


def test_axis_out_of_range_and_bad_masks_are_clear_errors():
    with pytest.raises(ValueError, match=r"^axis: expected axes in \[-2, 2\)"):
        SyncBatchNormalization(axis=3)(np.zeros((4, 3), "float32"))
    x = np.zeros((4, 3, 2), "float32")
    with pytest.raises(ValueError, match=r"mask: expected one dimension less than the inputs"):
        SyncBatchNormalization()(x, mask=np.ones((4,), bool))


def test_inference_ignores_a_mask_as_keras_does():
    """Keras' Masking before the layer: inference (and trainable=False) uses the moving
    statistics, which a mask does not change (keras' test_correctness checks this)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 2)).astype("float32")
    mask = np.array([[1, 1, 0]] * 4, bool)
    layer = SyncBatchNormalization(moving_mean_initializer="random_uniform")
    np.testing.assert_allclose(np_(layer(x, mask=mask)), np_(layer(x)))
    layer.trainable = False
    np.testing.assert_allclose(np_(layer(x, mask=mask, training=True)), np_(layer(x)))


def test_eval_never_communicates():
    class Counting:
        rank, size, calls = 0, 1, 0

        def allreduce(self, buf):
            Counting.calls += 1

    layer = SyncBatchNormalization(comm=Counting())
    x = np.ones((4, 3), "float32")
    layer(x), layer(x, training=False)
    assert Counting.calls == 0
    layer(x * np.arange(4.0, dtype="float32")[:, None], training=True)
    assert Counting.calls == 1


# ---- multi-rank, real mpiexec ------------------------------------------------------------

@pytest.mark.parametrize("nranks", [2, 3])
def test_mpi_ranks_equal_keras_batchnormalization_on_the_concatenated_batch(nranks,
                                                                              tmp_path):
    rng = np.random.default_rng(10 + nranks)
    sizes = [3, 0, 2][:nranks] if nranks == 3 else [3, 2]  # an empty rank with 3
    total = sum(sizes)
    data = dict(sizes=np.array(sizes), axis=np.array(-1))
    for s in range(3):
        data[f"x{s}"] = (rng.standard_normal((total, 4, 3)) * 2 + 3).astype("float32")
        data[f"g{s}"] = rng.standard_normal((total, 4, 3)).astype("float32")
        data[f"mx{s}"] = rng.standard_normal((total, 6, 6, 2)).astype("float32")
        data[f"mt{s}"] = rng.standard_normal((total, 2)).astype("float32")
        data[f"k{s}"] = rng.random((total, 4)) > 0.3
        data[f"k{s}"][:2] = True  # at least 2 counted values per channel
    np.savez(tmp_path / "data.npz", **data)
    run_mpi(nranks, WORKERS / "keras_worker.py", tmp_path / "data.npz", tmp_path, timeout=240)
    res = [dict(np.load(tmp_path / f"rank{r}.npz")) for r in range(nranks)]
    offs = np.cumsum([0] + sizes)

    ref = keras.layers.BatchNormalization(axis=-1)
    for s in range(3):
        x = torch.tensor(data[f"x{s}"], requires_grad=True)
        y = ref(x, training=True)
        (y * torch.tensor(data[f"g{s}"])).sum().backward()
        for r in range(nranks):
            sl = slice(offs[r], offs[r + 1])
            np.testing.assert_allclose(res[r][f"y{s}"], np_(y)[sl], rtol=1e-5, atol=2e-5)
            np.testing.assert_allclose(res[r][f"dx{s}"], x.grad.numpy()[sl], rtol=1e-4,
                                       atol=1e-4)
    for r in range(nranks):
        for w in ref.weights:
            np.testing.assert_allclose(res[r][f"layer_{w.name}"], np_(w), rtol=1e-5,
                                       atol=1e-6, err_msg=w.name)
        np.testing.assert_allclose(res[r]["infer"], np_(ref(data["x0"][:4])), rtol=1e-5,
                                   atol=2e-5)

    model = make_model(sync=False)  # keras.layers.BatchNormalization, one process
    opt = keras.optimizers.SGD(learning_rate=0.1)
    for s in range(3):
        loss = ((model(torch.tensor(data[f"mx{s}"]), training=True)
                 - torch.tensor(data[f"mt{s}"])) ** 2).sum() / total
        model.zero_grad()
        loss.backward()
        opt.apply([v.value.grad for v in model.trainable_weights], model.trainable_weights)
    for r in range(nranks):
        for i, w in enumerate(model.weights):
            np.testing.assert_allclose(res[r][f"model_{i}_{w.name}"], np_(w), rtol=1e-4,
                                       atol=1e-5, err_msg=f"rank {r} weight {i} {w.name}")

    # masked statistics: keras' masked moments on the concatenated batch
    for label, axis in (("mlast", -1), ("mfirst", 1)):
        ref = keras.layers.BatchNormalization(axis=axis)
        for s in range(3):
            x = torch.tensor(data[f"x{s}"], requires_grad=True)
            y = ref(x, training=True, mask=torch.tensor(data[f"k{s}"]))
            (y * torch.tensor(data[f"g{s}"])).sum().backward()
            for r in range(nranks):
                sl = slice(offs[r], offs[r + 1])
                np.testing.assert_allclose(res[r][f"{label}_y{s}"], np_(y)[sl], rtol=1e-4,
                                           atol=1e-4, err_msg=f"{label} y{s}")
                np.testing.assert_allclose(res[r][f"{label}_dx{s}"], x.grad.numpy()[sl],
                                           rtol=1e-4, atol=1e-4, err_msg=f"{label} dx{s}")
        for r in range(nranks):
            for w in ref.weights:
                np.testing.assert_allclose(res[r][f"{label}_{w.name}"], np_(w), rtol=1e-4,
                                           atol=1e-5, err_msg=f"{label} {w.name}")
    assert syncbn.build_info()["mpi"]


def test_keras_example_under_mpiexec_2_ranks():
    out = run_mpi(2, WORKERS.parent.parent / "examples" / "keras_mpi.py", timeout=240)
    assert "OK" in out.stdout and "MISMATCH" not in out.stdout, out.stdout


@pytest.mark.skipif(not (torch.cuda.is_available() and syncbn.build_info()["cuda"]),
                    reason="needs a CUDA device and syncbn's CUDA module")
def test_on_cuda_equals_keras_batchnormalization():
    rng = np.random.default_rng(5)
    with keras.device("cuda:0"):
        ours = SyncBatchNormalization(axis=1, momentum=0.9, comm=syncbn.comm.local())
        ref = keras.layers.BatchNormalization(axis=1, momentum=0.9)
        ours.build((6, 3, 4, 4)), ref.build((6, 3, 4, 4))
        for _ in range(2):
            x = torch.tensor(rng.standard_normal((6, 3, 4, 4)) * 2 + 1, dtype=torch.float32,
                             device="cuda", requires_grad=True)
            yo, yr = ours(x, training=True), ref(x, training=True)
            assert yo.is_cuda
            np.testing.assert_allclose(np_(yo), np_(yr), rtol=1e-5, atol=2e-5)
            g = torch.randn_like(x)  # sum(y**2) would have a ~0 input gradient
            go = torch.autograd.grad((yo * g).sum(), x)[0]
            gr = torch.autograd.grad((yr * g).sum(), x)[0]
            np.testing.assert_allclose(go.cpu().numpy(), gr.cpu().numpy(), rtol=1e-4, atol=1e-4)
        for wo, wr in zip(ours.weights, ref.weights, strict=True):
            np.testing.assert_allclose(np_(wo), np_(wr), rtol=1e-5, atol=1e-6, err_msg=wo.name)
        x = torch.randn(5, 3, 4, 4, device="cuda")
        np.testing.assert_allclose(np_(ours(x)), np_(ref(x)), rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("axis", [-1, 1, [1, 2]])
def test_masked_training_equals_keras_batchnormalization(axis):
    """A mask of positions (axis=-1), one that varies along the channels (axis=1: Keras
    broadcasts the mask over the last axis), and two feature axes: y, dx and the moving
    statistics equal keras.layers.BatchNormalization's masked moments."""
    rng = np.random.default_rng(3)
    x0 = (rng.standard_normal((6, 4, 3)) * 2 + 1).astype("float32")
    x0[:, 1] = 50.0  # masked out below: counting it would move the statistics far
    mask = rng.random((6, 4)) > 0.3
    mask[:, 1], mask[:2, 0] = False, True
    g = torch.tensor(rng.standard_normal((6, 4, 3)).astype("float32"))
    outs = []
    # keras' class takes one axis: two are checked against float64 masked moments
    for layer in (SyncBatchNormalization(axis=axis, momentum=0.5),
                  keras.layers.BatchNormalization(axis=axis, momentum=0.5)
                  if not isinstance(axis, list) else None):
        if layer is None:
            mb = np.broadcast_to(mask[..., None], x0.shape)
            k = np.maximum(mb.sum(0), 1)
            mean = np.where(mb, x0, 0).astype(np.float64).sum(0) / k
            var = np.where(mb, (x0 - mean) ** 2, 0).sum(0) / k
            y = (x0 - mean) / np.sqrt(var + 1e-3)
            outs.append((y, outs[0][1], 0.5 * mean, 0.5 + 0.5 * var))  # dx: not checked here
            continue
        x = torch.tensor(x0, requires_grad=True)
        y = layer(x, training=True, mask=torch.tensor(mask))
        (y * g).sum().backward()
        outs.append((np_(y), x.grad.numpy(), np_(layer.moving_mean), np_(layer.moving_variance)))
    axes = [a % 3 for a in (axis if isinstance(axis, list) else [axis])]
    counts = np.broadcast_to(mask[..., None], x0.shape).sum(
        axis=tuple(d for d in range(3) if d not in axes))
    assert (counts == 0).any() == (axis != -1)  # a channel with nothing counted
    for got, want, what in zip(outs[0], outs[1], ("y", "dx", "mean", "var"), strict=True):
        if what in ("mean", "var"):
            got, want = np.reshape(got, counts.shape), np.reshape(want, counts.shape)
            # README: Keras moves a channel that counted nothing toward (0, 0), the moments
            # of its empty set; syncbn leaves it (0, 1 here: the initial values).
            np.testing.assert_array_equal(got[counts == 0], 0.0 if what == "mean" else 1.0)
            got, want = got[counts > 0], want[counts > 0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=what)


def test_training_with_every_position_masked_out_uses_mean_0_and_variance_0():
    """No counted element anywhere: the statistics are mean 0, variance 0 (y = x /
    sqrt(eps) * gamma + beta) and the moving statistics stay as they were. A training call
    on unmasked data first leaves the heap full of nonzero per-channel values, so the
    all-masked call cannot pass on memory that happens to be zero."""
    rng = np.random.default_rng(5)
    layer = SyncBatchNormalization(axis=-1, momentum=0.5)
    x = torch.tensor((rng.standard_normal((4, 5, 8)) * 3 + 7).astype("float32"))
    layer(x, training=True)  # builds; its statistics are far from 0
    layer.gamma.assign(rng.uniform(0.5, 1.5, 8).astype("float32"))
    layer.beta.assign(rng.uniform(1.0, 2.0, 8).astype("float32"))
    layer(x, training=True)
    before = (np_(layer.moving_mean).copy(), np_(layer.moving_variance).copy())
    y = layer(x, training=True, mask=torch.zeros(4, 5, dtype=torch.bool))
    gamma, beta = np_(layer.gamma), np_(layer.beta)
    np.testing.assert_allclose(np_(y), np_(x) / np.sqrt(1e-3) * gamma + beta, rtol=1e-5)
    np.testing.assert_array_equal(np_(layer.moving_mean), before[0])
    np.testing.assert_array_equal(np_(layer.moving_variance), before[1])
