"""A model holding the variables whose dtypes Keras's backends disagree on, shared by the
backend tests and by the child processes of the cross-backend tests (so: no pytest here).

- a float64 variable: float32 values under JAX with x64 off (its default);
- an int64 counter: int32 values under JAX; non-trainable, as torch requires of integers;
- a bfloat16 variable;
- Adam's iteration count: Keras's "int", int64 under TensorFlow and int32 elsewhere.
"""

from __future__ import annotations

import keras
import numpy as np


@keras.saving.register_keras_serializable("fastckpt_tests")
class Bag(keras.layers.Layer):
    """A float64, a float32, an integer counter and a bfloat16 variable."""

    def build(self, input_shape):
        self.wide = self.add_weight(shape=(4,), dtype="float64", initializer="random_normal")
        self.narrow = self.add_weight(shape=(4,), initializer="random_normal")
        self.count = self.add_weight(shape=(), dtype="int64", initializer="zeros", trainable=False)
        self.half = self.add_weight(shape=(3,), dtype="bfloat16", initializer="random_normal")

    def call(self, x):
        self.count.assign_add(keras.ops.cast(1, self.count.dtype))
        extra = keras.ops.sum(keras.ops.cast(self.wide, x.dtype)) + keras.ops.sum(
            keras.ops.cast(self.half, x.dtype)
        )
        return x * keras.ops.cast(self.narrow, x.dtype) + extra


def bag_model(seed: int, big: bool = False) -> keras.Model:
    """Dense -> Dense -> Bag -> Dense, trained two steps with Adam (its slots and count
    exist). `big` makes the first kernel 1 MiB, so that it goes through the snapshot arena."""
    keras.utils.set_random_seed(seed)
    width = 512 if big else 8
    model = keras.Sequential(
        [
            keras.Input((width,)),
            keras.layers.Dense(512 if big else 4),
            keras.layers.Dense(4),
            Bag(name="bag"),
            keras.layers.Dense(2),
        ]
    )
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(seed).normal(size=(8, width)).astype("float32")
    model.fit(x, np.ones((8, 2), "float32"), epochs=1, batch_size=4, verbose=0)
    return model


def held_state(model: keras.Model) -> list[np.ndarray]:
    """Every model and optimizer variable's values, as the backend holds them."""
    variables = [*model.variables, *model.optimizer.variables]
    return [np.asarray(keras.ops.convert_to_numpy(v.value)) for v in variables]


def assert_same_held_state(a: keras.Model, b: keras.Model) -> None:
    for x, y in zip(held_state(a), held_state(b), strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()
