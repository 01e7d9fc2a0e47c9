"""Loading's last step: host arrays -> variables, on the calling thread.

Keras's `Variable.assign` costs ~230 us a variable under TensorFlow (conversion, checks,
autocast scope); shapes and dtypes are already checked against the file by then, so the
TensorFlow path assigns through the eager fast-path op (~27 us). Other backends, and
plans with values that are not variables, go through Keras.
"""

from __future__ import annotations

import keras
import numpy as np

from fastckpt import _keras_private
from fastckpt._walk import Entry


def assign_all(entries: list[Entry], values: list[np.ndarray]) -> None:
    """Assigns `values[i]` to `entries[i].source` (a keras.Variable) for every i."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assign = _keras_private.tf_assign_variable_op()
        for entry, value in zip(entries, values, strict=True):
            variable = entry.source.value
            if isinstance(variable, tf.distribute.DistributedValues):
                entry.source.assign(value)  # every replica, through the strategy
            else:
                assign(variable.handle, value)
        return
    for entry, value in zip(entries, values, strict=True):
        entry.source.assign(value)
