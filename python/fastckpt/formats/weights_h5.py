"""`.weights.h5`: Keras 3's weights layout (`saving_lib.H5IOStore`): one `vars` group per
saveable object, with its `name` attribute, and one dataset per value, model and optimizer
state together."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import h5py
import numpy as np

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats import EXTRA_GROUP, SaveRequest
from fastckpt.formats._hdf5 import (
    attr,
    check_global_heaps,
    content_nodes,
    dataset_attrs,
    group_attrs,
    h5_fallback,
    h5_tensors,
)
from fastckpt.formats._reading import Checkpoint, Groups

if TYPE_CHECKING:
    from fastckpt._walk import SavePlan
    from fastckpt.formats import Contents


def nodes(plan: SavePlan, arrays: Sequence[np.ndarray]) -> list[_fastckpt.Node]:
    """The tree of Keras's `.weights.h5` for a plan; dataset `i` holds `arrays[i]`."""
    out = [
        _fastckpt.Node(f"/{path}", None, [attr(k, v) for k, v in a.items()])
        for path, a in plan.groups
    ]
    for i, (entry, arr) in enumerate(zip(plan.entries, arrays, strict=True)):
        out.append(_fastckpt.Node(f"/{entry.path}", i, dataset_attrs(arr)))
    return out


def tensors(plan: SavePlan, arrays: Sequence[np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """`(weight path, array)` in plan order: what every weights-tree format writes."""
    return [(e.path, a) for e, a in zip(plan.entries, arrays, strict=True)]


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    found = tensors(request.plan, request.arrays)
    tree = nodes(request.plan, request.arrays)
    extra = request.extra
    if extra is not None:
        # Keras's files have no root attributes and no `fastckpt` group: Keras's loader
        # visits only its own objects' groups, so it reads such a file as it reads its own.
        tree.insert(0, _fastckpt.Node("/", None, [attr(k, v) for k, v in extra.attrs.items()]))
        tree.append(_fastckpt.Node(f"/{EXTRA_GROUP}", None, []))
        for name, arr in extra.tensors:
            tree.append(_fastckpt.Node(f"/{EXTRA_GROUP}/{name}", len(found), dataset_attrs(arr)))
            found.append((f"{EXTRA_GROUP}/{name}", arr))
    return [_fastckpt.plan_hdf5(request.path, found, tree)]


def open(path: str) -> Checkpoint:
    with h5py.File(path, "r") as f:
        # String attributes are read through the global heap: checked first (h5_tensors).
        has_attrs = len(f.attrs) > 0
        found = h5_tensors(f, 0, os.path.getsize(path), path, all_strings=has_attrs)
        attrs = {str(k): _text(v) for k, v in f.attrs.items()} if has_attrs else {}
    prefix = f"{EXTRA_GROUP}/"
    extras = {n: t for n, t in found.items() if n.startswith(prefix)}
    keras_tree = {n: t for n, t in found.items() if not n.startswith(prefix)}
    return Checkpoint(path, keras_tree, attrs, None, h5_fallback(lambda stack: path), extras)


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf8")
    if isinstance(value, str):
        return value
    raise CheckpointContentError(f"root attribute of type {type(value).__name__}: not text")


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    names = [name for name, _ in contents.tensors]
    nodes = content_nodes(contents.groups, names, contents.dtypes)
    return [_fastckpt.plan_hdf5(contents.path, contents.tensors, nodes)]


def extras(path: str) -> Groups:
    check_global_heaps(path)
    with h5py.File(path, "r") as f:
        return Groups(group_attrs(f))
