"""Loading's last step: host arrays -> variables, on the calling thread.

Keras's `Variable.assign` costs ~230 us a variable under TensorFlow (conversion, checks,
autocast scope); shapes and dtypes are already checked against the file by then, so the
TensorFlow path assigns through the eager fast-path op (~27 us). Other backends, and
plans with values that are not variables, go through Keras.
"""

from __future__ import annotations

import numpy as np
from keras.src import backend

from fastckpt._walk import Entry


def assign_all(entries: list[Entry], values: list[np.ndarray]) -> None:
    """Assigns `values[i]` to `entries[i].source` (a keras.Variable) for every i."""
    if backend.backend() == "tensorflow":
        from tensorflow.python.ops import gen_resource_variable_ops

        assign = gen_resource_variable_ops.assign_variable_op
        for entry, value in zip(entries, values, strict=True):
            assign(entry.source.value.handle, value)
        return
    for entry, value in zip(entries, values, strict=True):
        entry.source.assign(value)
