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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import h5py

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats import SaveRequest
from fastckpt.formats._hdf5 import attr, check_global_heaps, dtype_attrs, group_attrs, h5_tensors
from fastckpt.formats._reading import Checkpoint, Groups, TensorInfo

if TYPE_CHECKING:
    from fastckpt.formats import Contents


@dataclasses.dataclass
class Shard:
    filename: str
    nodes: list[_fastckpt.Node] = dataclasses.field(default_factory=list)
    tensors: list[tuple[str, Any]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class Item:
    """One value to shard: in `group` under `key`, `nbytes` of `dtype`."""

    group: str
    key: str
    value: Any  # a numpy array, or a `_fastckpt.SourceTensor`
    dtype: str
    nbytes: int

    @property
    def path(self) -> str:
        return f"{self.group}/{self.key}"


def _readable(size: float) -> str:
    from fastckpt import _keras_private

    return _keras_private.readable_memory_size(size)


def _readable_without_keras(size: float) -> str:
    # Keras's readable_memory_size, for conversions run without Keras.
    units = ("B", "KB", "MB", "GB", "TB", "PB")
    for unit in units:
        if size / 1024 < 1:
            return f"{size:.2f} {unit}"
        size /= 1024
    return f"{size:.2f} {units[-1]}"


def plan_shards(
    groups: list[tuple[str, dict[str, str]]],
    groups_at: list[int],
    items: list[Item],
    index_path: str,
    max_shard_size: float,
    readable: Callable[[float], str] = _readable,
) -> tuple[list[Shard], dict[str, Any]]:
    """Splits the values into shards the way `ShardedH5IOStore` does (`groups[i]` is
    created once `groups_at[i]` values are stored); returns the shards and the index
    document."""
    limit = float(max_shard_size) * 1024**3
    stem = os.path.basename(index_path)[: -len(".json")].replace(".weights", "")
    shards = [Shard(f"{stem}_00000.weights.h5")]
    created: set[str] = set()  # groups that exist in the current shard
    weight_map: dict[str, Any] = {}
    current = total = 0.0
    group_index = 0

    def create_groups_up_to(n_entries: int) -> None:
        nonlocal group_index
        while group_index < len(groups) and groups_at[group_index] <= n_entries:
            path, attrs = groups[group_index]
            shards[-1].nodes.append(
                _fastckpt.Node(f"/{path}", None, [attr(k, v) for k, v in attrs.items()])
            )
            created.add(path)
            group_index += 1

    for i, item in enumerate(items):
        create_groups_up_to(i)
        size = item.nbytes
        total += size
        if size > limit:
            raise ValueError(
                f"The size of {item.key} is {readable(size)} which exceeds the maximum "
                f"shard size {readable(limit)}. You can increase the `max_shard_size` "
                "parameter to accommodate the size."
            )
        current += size
        if current > limit:
            shards.append(Shard(f"{stem}_{len(shards):05}.weights.h5"))
            created.clear()
            current = size
        shard = shards[-1]
        if item.group not in created:
            # Keras re-creates the group in a new shard without its attributes.
            shard.nodes.append(_fastckpt.Node(f"/{item.group}", None, []))
            created.add(item.group)
        shard.nodes.append(
            _fastckpt.Node(f"/{item.path}", len(shard.tensors), dtype_attrs(item.dtype))
        )
        shard.tensors.append((item.path, item.value))
        # Keras stores the first shard name as a string and turns it into a list at the
        # group's second value, whichever shard that lands in.
        key = f"/{item.group}"
        if key not in weight_map:
            weight_map[key] = shard.filename
        else:
            if not isinstance(weight_map[key], list):
                weight_map[key] = [weight_map[key]]
            if shard.filename not in weight_map[key]:
                weight_map[key].append(shard.filename)
    create_groups_up_to(len(items))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    return shards, index


def _files(shards: list[Shard], index: dict[str, Any], path: str) -> list[_fastckpt.PlannedFile]:
    folder = os.path.dirname(path)
    files = [
        _fastckpt.plan_hdf5(os.path.join(folder, s.filename), s.tensors, s.nodes) for s in shards
    ]
    return [*files, _fastckpt.plan_bytes(path, json.dumps(index, indent=4).encode())]


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    assert request.max_shard_size is not None
    plan = request.plan
    items = [
        Item(e.group, e.key, arr, arr.dtype.name, arr.size * arr.dtype.itemsize)
        for e, arr in zip(plan.entries, request.arrays, strict=True)
    ]
    shards, index = plan_shards(
        plan.groups, plan.groups_at, items, request.path, request.max_shard_size
    )
    return _files(shards, index, request.path)


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    assert contents.max_shard_size is not None
    items = []
    for (name, value), dtype in zip(contents.tensors, contents.dtypes, strict=True):
        group, _, key = name.rpartition("/")
        nbytes = value.nbytes
        items.append(Item(group, key, value, dtype, int(nbytes)))
    # Each group is created before its first value, as Keras's walk creates it.
    first: dict[str, int] = {}
    for i, item in enumerate(items):
        first.setdefault(item.group, i)
    groups_at = [first.get(path, len(items)) for path, _ in contents.groups]
    order = sorted(range(len(contents.groups)), key=lambda g: groups_at[g])
    shards, index = plan_shards(
        [contents.groups[g] for g in order],
        [groups_at[g] for g in order],
        items,
        contents.path,
        contents.max_shard_size,
        readable=_readable_without_keras,
    )
    return _files(shards, index, contents.path)


def _shard_paths(path: str) -> list[str]:
    """The shards a `.weights.json` index names, beside it, each once in index order."""
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
    return [os.path.join(folder, name) for name in shards]


def open(path: str) -> Checkpoint:
    """A `.weights.json` index and its `_00000.weights.h5` shards, beside it."""
    shards = _shard_paths(path)
    found: dict[str, TensorInfo] = {}
    for shard in shards:
        with h5py.File(shard, "r") as f:
            for key, info in h5_tensors(f, 0, os.path.getsize(shard), shard).items():
                if info.offset < 0:
                    raise CheckpointContentError(f"{shard}: {key} is not stored contiguously")
                found[key] = dataclasses.replace(info, file=shard)
    return Checkpoint(path, found, {}, None)


def extras(path: str) -> Groups:
    """The groups of every shard (a group split over shards has its attributes in the
    first)."""
    found: dict[str, dict[str, str]] = {}
    for shard in _shard_paths(path):
        check_global_heaps(shard)
        with h5py.File(shard, "r") as f:
            for name, attrs in group_attrs(f):
                if attrs or name not in found:
                    found[name] = {**found.get(name, {}), **attrs}
    return Groups(list(found.items()))
