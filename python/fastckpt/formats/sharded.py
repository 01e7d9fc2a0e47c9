"""Sharded weights as Keras 3.10+ writes them (`save_weights(p, max_shard_size=GB)`):
`<stem>_00000.weights.h5`, `<stem>_00001.weights.h5`, ... and a `<stem>.weights.json`
index. The split follows `saving_lib.ShardedH5IOStore` exactly, so the same model gives
the same shards; the shards and the index are one write that commits together, the index
last (`_fastckpt.write` of several files)."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats import SaveRequest
from fastckpt.formats._hdf5 import attr, dataset_attrs, h5_tensors
from fastckpt.formats._reading import Checkpoint, TensorInfo

if TYPE_CHECKING:
    from fastckpt._walk import SavePlan


@dataclasses.dataclass
class Shard:
    filename: str
    nodes: list[_fastckpt.Node] = dataclasses.field(default_factory=list)
    tensors: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)


def _readable(size: float) -> str:
    from fastckpt import _keras_private

    return _keras_private.readable_memory_size(size)


def plan_shards(
    plan: SavePlan, arrays: list[np.ndarray], index_path: str, max_shard_size: float
) -> tuple[list[Shard], dict[str, Any]]:
    """Splits a plan into shards the way `ShardedH5IOStore` does; returns the shards and
    the index document."""
    limit = float(max_shard_size) * 1024**3
    stem = os.path.basename(index_path)[: -len(".json")].replace(".weights", "")
    shards = [Shard(f"{stem}_00000.weights.h5")]
    created: set[str] = set()  # groups that exist in the current shard
    weight_map: dict[str, Any] = {}
    current = total = 0.0
    group_index = 0

    def create_groups_up_to(n_entries: int) -> None:
        nonlocal group_index
        while group_index < len(plan.groups) and plan.groups_at[group_index] <= n_entries:
            path, attrs = plan.groups[group_index]
            shards[-1].nodes.append(
                _fastckpt.Node(f"/{path}", None, [attr(k, v) for k, v in attrs.items()])
            )
            created.add(path)
            group_index += 1

    for i, (entry, arr) in enumerate(zip(plan.entries, arrays, strict=True)):
        create_groups_up_to(i)
        size = arr.size * arr.dtype.itemsize
        total += size
        if size > limit:
            raise ValueError(
                f"The size of {entry.key} is {_readable(size)} which exceeds the maximum "
                f"shard size {_readable(limit)}. You can increase the `max_shard_size` "
                "parameter to accommodate the size."
            )
        current += size
        if current > limit:
            shards.append(Shard(f"{stem}_{len(shards):05}.weights.h5"))
            created.clear()
            current = size
        shard = shards[-1]
        if entry.group not in created:
            # Keras re-creates the group in a new shard without its attributes.
            shard.nodes.append(_fastckpt.Node(f"/{entry.group}", None, []))
            created.add(entry.group)
        shard.nodes.append(_fastckpt.Node(f"/{entry.path}", len(shard.tensors), dataset_attrs(arr)))
        shard.tensors.append((entry.path, arr))
        # Keras stores the first shard name as a string and turns it into a list at the
        # group's second value, whichever shard that lands in.
        key = f"/{entry.group}"
        if key not in weight_map:
            weight_map[key] = shard.filename
        else:
            if not isinstance(weight_map[key], list):
                weight_map[key] = [weight_map[key]]
            if shard.filename not in weight_map[key]:
                weight_map[key].append(shard.filename)
    create_groups_up_to(len(plan.entries))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return shards, index


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    assert request.max_shard_size is not None
    shards, index = plan_shards(request.plan, request.arrays, request.path, request.max_shard_size)
    folder = os.path.dirname(request.path)
    files = [
        _fastckpt.plan_hdf5(os.path.join(folder, s.filename), s.tensors, s.nodes) for s in shards
    ]
    return [*files, _fastckpt.plan_bytes(request.path, json.dumps(index, indent=4).encode())]


def open(path: str) -> Checkpoint:
    """A `.weights.json` index and its `_00000.weights.h5` shards, beside it."""
    with builtins.open(path, "rb") as f:
        index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointContentError(f"{path}: not a sharded weights index (no weight_map)")
    shards: list[str] = []
    for files in weight_map.values():
        for name in files if isinstance(files, list) else [files]:
            if (
                not isinstance(name, str)
                or os.path.basename(name) != name
                or name in ("", ".", "..")
            ):
                raise CheckpointContentError(f"{path}: bad shard name {name!r} in the index")
            if name not in shards:
                shards.append(name)
    folder = os.path.dirname(path)
    found: dict[str, TensorInfo] = {}
    for name in shards:
        shard = os.path.join(folder, name)
        with h5py.File(shard, "r") as f:
            for key, info in h5_tensors(f, 0, os.path.getsize(shard), shard).items():
                if info.offset < 0:
                    raise CheckpointContentError(f"{shard}: {key} is not stored contiguously")
                found[key] = dataclasses.replace(info, file=shard)
    return Checkpoint(path, found, {}, None)
