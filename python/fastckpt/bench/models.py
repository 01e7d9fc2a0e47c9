"""Synthetic models of a chosen checkpoint size and variable count.

- `sized_model`: a few big variables (GiB scale), for throughput and scaling.
- `many_variables_model`: one layer holding N tiny variables, for the per-variable cost.
- `training_model`: a Dense stack compiled with Adam, for stall, slowdown, memory and load.

Variables are filled with a constant: no format here compresses, so the values do not change
what is written, and constant fills are far cheaper to build than random initializers.
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from fastckpt.bench.measure import MIB

# Big variables are this large (a 4096x2048 float32 kernel), as in the performance notes'
# "1 GiB in 32 big variables".
BIG_VARIABLE_BYTES = 32 * MIB


@keras.saving.register_keras_serializable(package="fastckpt_bench")
class BigVariables(keras.layers.Layer):
    """`count` float32 variables of shape (rows, cols); passes its input through."""

    def __init__(self, count: int = 1, rows: int = 1, cols: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.count, self.rows, self.cols = count, rows, cols

    def build(self, input_shape):
        self.blocks = [
            self.add_weight(shape=(self.rows, self.cols), initializer="ones", name=f"block_{i}")
            for i in range(self.count)
        ]

    def call(self, x):
        return x

    def get_config(self):
        return {**super().get_config(), "count": self.count, "rows": self.rows, "cols": self.cols}


@keras.saving.register_keras_serializable(package="fastckpt_bench")
class ManyVariables(keras.layers.Layer):
    """`count` tiny float32 variables (8x8: 256 bytes each); passes its input through.

    Keras's `add_weight` costs 1-2 ms per variable, so 20,000 take about half a minute."""

    def __init__(self, count: int = 1, **kwargs):
        super().__init__(**kwargs)
        self.count = count

    def build(self, input_shape):
        self.tiny = [
            self.add_weight(shape=(8, 8), initializer="zeros", name=f"v{i}")
            for i in range(self.count)
        ]

    def call(self, x):
        return x

    def get_config(self):
        return {**super().get_config(), "count": self.count}


def state_bytes(model: keras.Model, include_optimizer: bool = True) -> int:
    """Bytes of every variable a checkpoint of `model` holds."""
    variables = list(model.variables)
    if include_optimizer and getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(
        int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in variables
    )


def sized_model(nbytes: int, variable_bytes: int = BIG_VARIABLE_BYTES) -> keras.Model:
    """A model of about `nbytes` of float32 weights in big variables (at least 4)."""
    count = max(4, round(nbytes / variable_bytes))
    elements = nbytes // (4 * count)
    cols = 2048 if elements % 2048 == 0 else 1
    model = keras.Sequential(
        [keras.Input((1,)), BigVariables(count, elements // cols, cols, name="big")], name="sized"
    )
    return model


def many_variables_model(count: int) -> keras.Model:
    """A model whose one layer holds `count` tiny variables."""
    return keras.Sequential([keras.Input((1,)), ManyVariables(count, name="many")], name="many")


@dataclasses.dataclass
class TrainingSetup:
    """A compiled model with its optimizer built, and data for `steps` batches."""

    model: keras.Model
    x: np.ndarray
    y: np.ndarray
    batch: int

    def fit(self, steps: int, callbacks=None) -> None:
        n = steps * self.batch
        self.model.fit(
            self.x[:n],
            self.y[:n],
            batch_size=self.batch,
            epochs=1,
            shuffle=False,
            verbose=0,
            callbacks=callbacks or [],
        )

    def step(self, i: int = 0) -> None:
        lo = (i * self.batch) % (len(self.x) - self.batch + 1)
        self.model.train_on_batch(self.x[lo : lo + self.batch], self.y[lo : lo + self.batch])


def training_model(
    weight_bytes: int, steps: int = 64, width: int | None = None, batch: int = 4, seed: int = 0
) -> TrainingSetup:
    """A Dense stack of about `weight_bytes` of float32 weights (layers of `width` units:
    2048, or 1024 below 64 MiB), compiled with Adam and trained one step, so a checkpoint
    holds the weights and twice as much optimizer state (about 3x `weight_bytes`)."""
    keras.utils.set_random_seed(seed)
    width = width or (2048 if weight_bytes >= 64 * MIB else 1024)
    depth = max(1, round(weight_bytes / (4 * width * width)))
    layers = [keras.Input((width,))]
    layers += [keras.layers.Dense(width, name=f"dense_{i}") for i in range(depth)]
    model = keras.Sequential(layers, name="training")
    model.compile(optimizer="adam", loss="mse")
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((max(steps, 2) * batch, width), dtype=np.float32)
    y = np.zeros_like(x)
    setup = TrainingSetup(model, x, y, batch)
    setup.step()
    return setup
