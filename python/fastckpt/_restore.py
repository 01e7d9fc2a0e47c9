"""Loading's last steps: which file dtypes a variable accepts, and host arrays ->
variables, on the calling thread.

Keras's loaders cast whatever the file holds to the variable's dtype. fastckpt refuses a
mismatch instead (a float64 file into a float32 model is a mistake worth naming), with the
exceptions that keep a file loadable across backends, as Keras's are:

- Under JAX with x64 off (its default), a 64-bit variable holds 32-bit values (a float64
  variable holds float32), and saves them: as Keras does. A file holding the dtype the
  variable holds loads into it, and the same file loads into the 64-bit variable of the
  same model on TensorFlow or torch (widening keeps every value).
- Keras's `"int"` (an optimizer's iteration count) is int64 under TensorFlow and int32
  under JAX and torch: a file's int64 values load into an int32 variable when every value
  fits (checked before anything is assigned).

Keras's `Variable.assign` costs ~230 us a variable under TensorFlow (conversion, checks,
autocast scope); shapes and dtypes are already checked against the file by then, so the
TensorFlow path assigns through the eager fast-path op (~27 us). Other backends, and
plans with values that are not variables, go through Keras.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import keras
import numpy as np

from fastckpt import _keras_private, _readers
from fastckpt._walk import Entry

# A 64-bit dtype and what JAX holds it as with x64 off.
X64_OFF = {"float64": "float32", "int64": "int32", "uint64": "uint32", "complex128": "complex64"}


def held_dtype(variable: Any, values: Mapping[int, Any] | None = None) -> str:
    """The dtype the backend holds a variable's values in: its own dtype, but under JAX
    with x64 off a 64-bit one holds 32-bit values (and torch holds uint16 as int32);
    `values` as for `_readers.value_of`."""
    return str(keras.backend.standardize_dtype(_readers.value_of(variable, values).dtype))


def accepts(file_dtype: str, declared: str, held: str) -> str | None:
    """How values of `file_dtype` load into a variable of dtype `declared` holding `held`:
    `"cast"` (to `held`, every value kept or as the backend itself would hold them),
    `"fits"` (a narrowing cast, taken only if every value fits), or None (refused)."""
    if file_dtype in (declared, held) or X64_OFF.get(declared) == file_dtype:
        return "cast"
    if X64_OFF.get(file_dtype) == declared and declared.startswith(("int", "uint")):
        return "fits"
    return None


def converted(value: np.ndarray, held: np.dtype, how: str) -> np.ndarray | None:
    """`value` as `held` (None when `how` is "fits" and some value does not fit)."""
    if value.dtype == held:
        return value
    out = value.astype(held)
    if how == "fits" and not np.array_equal(out, value):
        return None
    return out


def assign_all(entries: list[Entry], values: list[np.ndarray]) -> None:
    """Assigns `values[i]` to `entries[i].source` (a keras.Variable) for every i; each value
    already has the dtype the variable holds."""
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
