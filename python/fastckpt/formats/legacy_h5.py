"""Legacy full-model `.h5` (tf.keras 2.x, still written by Keras 3 for `.h5` names):
`model_config`, `training_config`, `model_weights`, `optimizer_weights`, laid out by
Keras's own legacy saver, which fastckpt runs against a recorder (serving it the values of
the snapshot) and then writes in parallel, atomically and durably."""

from __future__ import annotations

import os
from typing import Any

import h5py
import numpy as np

from fastckpt import _fastckpt
from fastckpt.formats import SaveRequest, open_checkpoint
from fastckpt.formats._hdf5 import attr, h5_fallback, h5_tensors
from fastckpt.formats._reading import Checkpoint, content_errors


class _Recorder:
    """Stands in for an `h5py.File`/`Group` under Keras's legacy HDF5 saver and records
    the tree it would write, so the file layout is Keras's by construction."""

    def __init__(self, path: str, out: _LegacyTree) -> None:
        self._path = path
        self._out = out
        self.attrs = _Attrs(path, out)
        out.groups.setdefault(path, [])

    def _child(self, name: str | bytes) -> str:
        if isinstance(name, bytes):  # Keras passes the utf8-encoded weight names
            name = name.decode("utf8")
        return f"{self._path.rstrip('/')}/{name}"

    def create_group(self, name: str | bytes) -> _Recorder:
        return _Recorder(self._child(name), self._out)

    def create_dataset(
        self, name: str | bytes, shape: Any = None, dtype: Any = None, data: Any = None
    ) -> _Dataset:
        ds = _Dataset(self._child(name), self._out)
        if data is not None:
            ds[()] = data
        return ds

    def flush(self) -> None:
        pass


class _Attrs:
    def __init__(self, path: str, out: _LegacyTree) -> None:
        self._path, self._out = path, out

    def __setitem__(self, name: str, value: Any) -> None:
        self._out.groups.setdefault(self._path, []).append(attr(name, value))


class _Dataset:
    def __init__(self, path: str, out: _LegacyTree) -> None:
        self._path, self._out = path, out

    def __setitem__(self, index: Any, value: Any) -> None:
        self._out.datasets.append((self._path, np.asarray(value, order="C")))


class _LegacyTree:
    def __init__(self) -> None:
        self.groups: dict[str, list[_fastckpt.Attr]] = {}
        self.datasets: list[tuple[str, np.ndarray]] = []


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    import keras

    from fastckpt import _keras_private

    # Keras's saver asks for each variable's value: the snapshot's, where the plan has it.
    snapshot = {
        id(e.source): arr
        for e, arr in zip(request.plan.entries, request.arrays, strict=True)
        if isinstance(e.source, keras.Variable)
    }

    def value_of(variable: Any) -> Any:
        found = snapshot.get(id(variable))
        return found if found is not None else keras.ops.convert_to_numpy(variable)

    out = _LegacyTree()
    _keras_private.record_legacy_h5(
        request.model, request.plan.include_optimizer, _Recorder("/", out), value_of
    )
    nodes = [_fastckpt.Node(path, None, attrs) for path, attrs in out.groups.items()]
    nodes += [_fastckpt.Node(path, i, []) for i, (path, _) in enumerate(out.datasets)]
    return [_fastckpt.plan_hdf5(request.path, out.datasets, nodes)]


def open(path: str) -> Checkpoint:
    """Every dataset by its path in the file (for verifying and inspecting, and checked
    before Keras's legacy loader reads the file)."""
    with h5py.File(path, "r") as f:
        # Keras's legacy loader reads every string attribute
        found = h5_tensors(f, 0, os.path.getsize(path), path, all_strings=True)
    return Checkpoint(path, found, {}, None, h5_fallback(lambda stack: path))


def load(model: Any, path: str) -> None:
    """Loads the layout the way Keras loads it (layer by layer, by order), plus the
    optimizer state when both the file and the model have one. Keras's legacy loader
    follows soft and external links and trusts every dataset: the file is checked first,
    as the other readers check theirs."""
    from fastckpt import _keras_private

    open_checkpoint(path, legacy=True)
    with content_errors(path), h5py.File(path, "r") as f:
        _keras_private.load_legacy_h5(model, f)
