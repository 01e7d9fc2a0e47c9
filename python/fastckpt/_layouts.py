"""Stage 4's Python half: what goes into each format, as Keras would lay it out.

The Rust core plans the bytes; this module decides the tree: HDF5 groups, datasets and
attributes for `.weights.h5` and legacy `.h5`, and the members of a `.keras` zip.
"""

from __future__ import annotations

import json
import os
from typing import Any

import keras
import ml_dtypes
import numpy as np
from keras.src.saving import saving_lib

from fastckpt._walk import SavePlan

Attr = tuple[str, str, Any]
Node = tuple[str, "int | None", list[Attr]]


def attr(name: str, value: Any) -> Attr:
    """An attribute as h5py would store the Python value Keras assigns."""
    if isinstance(value, str):
        return (name, "utf8", value)
    if isinstance(value, bytes):
        return (name, "bytes", value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return (name, "fixed_bytes_array", (value.dtype.itemsize, [bytes(v) for v in value]))
    if isinstance(value, (list, tuple)):
        if not value:
            return (name, "empty_list", None)
        if all(isinstance(v, bytes) for v in value):
            return (name, "str_array", [v.decode("utf8") for v in value])
    raise TypeError(f"fastckpt cannot store attribute {name!r} of type {type(value).__name__}")


def weights_h5_nodes(plan: SavePlan, arrays: list[np.ndarray]) -> list[Node]:
    """The tree of Keras's `.weights.h5` for a plan (`saving_lib.H5IOStore`)."""
    nodes: list[Node] = [
        (f"/{path}", None, [attr(k, v) for k, v in attrs.items()]) for path, attrs in plan.groups
    ]
    for i, (entry, arr) in enumerate(zip(plan.entries, arrays, strict=True)):
        attrs = [attr("dtype", "bfloat16")] if arr.dtype == ml_dtypes.bfloat16 else []
        nodes.append((f"/{entry.path}", i, attrs))
    return nodes


def keras_zip_members(
    model: keras.Model, plan: SavePlan
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The members around `model.weights.h5` in a `.keras` file: metadata and config
    before it, `assets/...` after it, as `saving_lib.save_model` writes them."""
    config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    before = [("metadata.json", metadata_json.encode()), ("config.json", config_json.encode())]
    # Keras walks the whole model for assets on every save (most of the cost of a small
    # model's pause); only objects with `save_assets` ever write any, and which objects
    # those are changes only with the plan, so a plan without any skips the walk.
    if plan.has_assets is False:
        return before, []
    assets, asked = _assets(model)
    plan.has_assets = asked
    return before, assets


class _AssetStore(saving_lib.DiskIOStore):
    """Keras's asset store, noting whether any object asked for a folder."""

    asked = False

    def make(self, path):
        self.asked = True
        return super().make(path)


def _assets(model: keras.Model) -> tuple[list[tuple[str, bytes]], bool]:
    store = _AssetStore("assets", mode="w")
    try:
        saving_lib._save_state(model, None, store, "", set())
        files = []
        for root, _, names in os.walk(store.working_dir):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, store.working_dir).replace(os.sep, "/")
                with open(full, "rb") as f:
                    files.append((f"assets/{rel}", f.read()))
        return sorted(files), store.asked
    finally:
        store.close()


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

    def create_dataset(self, name: str | bytes, shape=None, dtype=None, data=None) -> _Dataset:
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
        self.groups: dict[str, list[Attr]] = {}
        self.datasets: list[tuple[str, np.ndarray]] = []


def legacy_h5(
    model: keras.Model, include_optimizer: bool
) -> tuple[list[Node], list[tuple[str, np.ndarray]]]:
    """The legacy tf.keras full-model `.h5` tree, recorded from Keras's own saver
    (`keras/src/legacy/saving/legacy_h5_format.save_model_to_hdf5`)."""
    from keras.src.legacy.saving import legacy_h5_format, saving_options, saving_utils
    from keras.src.legacy.saving.json_utils import get_json_type

    out = _LegacyTree()
    root = _Recorder("/", out)
    with saving_options.keras_option_scope(use_legacy_config=True):
        for k, v in saving_utils.model_metadata(model, include_optimizer).items():
            if isinstance(v, (dict, list, tuple)):
                root.attrs[k] = json.dumps(v, default=get_json_type).encode("utf8")
            else:
                root.attrs[k] = v
        legacy_h5_format.save_weights_to_hdf5_group(root.create_group("model_weights"), model)
        if include_optimizer and hasattr(model, "optimizer"):
            legacy_h5_format.save_optimizer_weights_to_hdf5_group(root, model.optimizer)
    nodes: list[Node] = [(path, None, attrs) for path, attrs in out.groups.items()]
    nodes += [(path, i, []) for i, (path, _) in enumerate(out.datasets)]
    return nodes, out.datasets
