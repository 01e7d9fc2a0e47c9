"""Independent oracles for "this file holds exactly one complete model state": every array
read back by the format's own tools (the `safetensors` package, h5py and `h5dump`, `zipfile`'s
CRC check) and by Keras itself, compared with the states of `children.state_arrays`."""

from __future__ import annotations

import collections
import subprocess
import zipfile

import h5py
import keras
import numpy as np

from children import all_variables


class Torn(AssertionError):
    """The file at the target is not one complete state."""


def _key(a: np.ndarray) -> tuple:
    a = np.asarray(a)
    return (a.dtype.str, a.shape, a.tobytes())


def which_state(arrays: list[np.ndarray], states: dict[str, list[np.ndarray]]) -> str:
    """ "A" or "B" when `arrays` are exactly that state's values (as a multiset), else
    raises Torn."""
    got = collections.Counter(_key(a) for a in arrays)
    for name, values in states.items():
        if got == collections.Counter(_key(a) for a in values):
            return name
    raise Torn(f"the file holds {len(arrays)} arrays matching neither state A nor B")


def _h5_datasets(f: h5py.File) -> list[np.ndarray]:
    out: list[np.ndarray] = []
    f.visititems(lambda _, obj: out.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def stock_arrays(path: str, fmt: str) -> list[np.ndarray]:
    """Every array in the file, read by the format's own tools."""
    if fmt == "safetensors":
        from safetensors.numpy import load_file

        return list(load_file(path).values())
    if fmt == "keras":
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()  # reads every member, checks its CRC-32
            if bad is not None:
                raise Torn(f"zip member {bad} fails its CRC")
            with h5py.File(zf.open("model.weights.h5"), "r") as f:
                return _h5_datasets(f)
    dump = subprocess.run(["h5dump", "-H", path], capture_output=True, timeout=60)
    if dump.returncode != 0:
        raise Torn(f"h5dump -H fails: {dump.stderr.decode(errors='replace')[-300:]}")
    with h5py.File(path, "r") as f:
        return _h5_datasets(f)


def _keras_arrays(path: str, fmt: str, model: keras.Model) -> list[np.ndarray] | None:
    """Every variable after Keras itself loads the file, in `all_variables` order (model
    variables only for the legacy format, which Keras loads with compile=False)."""
    if fmt == "weights_h5":
        model.load_weights(path)
        return [np.asarray(v.numpy()) for v in all_variables(model)]
    if fmt == "keras":
        loaded = keras.saving.load_model(path)
        return [np.asarray(v.numpy()) for v in all_variables(loaded)]
    if fmt == "legacy_h5":
        loaded = keras.saving.load_model(path, compile=False)
        return [np.asarray(v.numpy()) for v in loaded.variables]
    return None  # Keras does not read SafeTensors: the safetensors package is the oracle


def check_target(path: str, fmt: str, model: keras.Model, states: dict) -> str:
    """Which complete state the file holds, by every stock reader; raises Torn (or the
    reader's own error) otherwise."""
    which = which_state(stock_arrays(path, fmt), states)
    by_keras = _keras_arrays(path, fmt, model)
    if by_keras is not None:
        want = states[which][: len(by_keras)]
        for got, expected in zip(by_keras, want, strict=True):
            if _key(got) != _key(expected):
                raise Torn(f"Keras loads a mix: stock readers say {which}, Keras differs")
    return which


def model_states(width: int = 256) -> tuple[keras.Model, dict[str, list[np.ndarray]]]:
    """A model of `children.state_model`'s architecture and the values of states A and B."""
    from children import state_arrays, state_model

    model = state_model(width)
    return model, {"A": state_arrays(model, "A"), "B": state_arrays(model, "B")}
