"""The small Keras model shared by the Keras worker and tests (torch backend)."""

import keras


def make_model(sync=True, seed=0):
    from syncbn.keras import SyncBatchNormalization

    keras.utils.set_random_seed(seed)
    bn = SyncBatchNormalization if sync else keras.layers.BatchNormalization
    return keras.Sequential([
        keras.Input((6, 6, 2)),
        keras.layers.Conv2D(4, 3, padding="same"),
        bn(),
        keras.layers.ReLU(),
        keras.layers.Conv2D(3, 3),
        bn(momentum=0.9, epsilon=1e-2),
        keras.layers.Flatten(),
        keras.layers.Dense(2),
    ])
