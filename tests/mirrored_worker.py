"""A `tf.distribute.MirroredStrategy` training over 2 logical CPU devices, started by
test_distributed.py in a process of its own (logical devices must be set up before
TensorFlow starts): `python mirrored_worker.py FOLDER`. Prints one JSON line at the end."""

from __future__ import annotations

import json
import os
import sys

os.environ["KERAS_BACKEND"] = "tensorflow"

import tensorflow as tf

cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402
import numpy as np  # noqa: E402

import fastckpt  # noqa: E402

FOLDER = sys.argv[1]


def build() -> keras.Model:
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(16), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    return model


strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
x = np.random.default_rng(0).normal(size=(64, 8)).astype("float32")
y = x[:, :2].sum(axis=1, keepdims=True)
path = os.path.join(FOLDER, "mirrored.weights.h5")
with strategy.scope():
    model = build()
    model.fit(
        x,
        y,
        batch_size=16,
        epochs=2,
        verbose=0,
        callbacks=[fastckpt.ModelCheckpoint(path, save_weights_only=True)],
    )
    expected = [v.numpy() for v in [*model.variables, *model.optimizer.variables]]
    restored = build()
    restored.optimizer.build(restored.trainable_variables)
    fastckpt.load(restored, path)
    ours = [v.numpy() for v in [*restored.variables, *restored.optimizer.variables]]
stock = build()
stock.optimizer.build(stock.trainable_variables)
stock.load_weights(path)
theirs = [v.numpy() for v in [*stock.variables, *stock.optimizer.variables]]
print(
    json.dumps(
        {
            "replicas": strategy.num_replicas_in_sync,
            "restored_under_strategy": all(
                np.array_equal(a, b) for a, b in zip(expected, ours, strict=True)
            ),
            "stock_keras_reads_it": all(
                np.array_equal(a, b) for a, b in zip(expected, theirs, strict=True)
            ),
            "iterations": int(restored.optimizer.iterations.numpy()),
        }
    )
)
