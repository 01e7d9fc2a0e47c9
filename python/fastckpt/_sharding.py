"""Sharded weights as Keras 3.10+ writes them (`save_weights(p, max_shard_size=GB)`):
`<stem>_00000.weights.h5`, `<stem>_00001.weights.h5`, ... and a `<stem>.weights.json`
index. The split follows `saving_lib.ShardedH5IOStore` exactly, so the same model gives
the same shards; the shards are then written in parallel, the index last.
"""

from __future__ import annotations

import dataclasses
import json
import os
import threading
import time
from typing import Any

import ml_dtypes
import numpy as np

from fastckpt import _fastckpt, _layouts
from fastckpt._walk import SavePlan


@dataclasses.dataclass
class Shard:
    filename: str
    nodes: list[_layouts.Node] = dataclasses.field(default_factory=list)
    tensors: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)


def _readable(size: float) -> str:
    from keras.src.saving.saving_lib import readable_memory_size

    return readable_memory_size(size)


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
                (f"/{path}", None, [_layouts.attr(k, v) for k, v in attrs.items()])
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
            shard.nodes.append((f"/{entry.group}", None, []))
            created.add(entry.group)
        attrs = [_layouts.attr("dtype", "bfloat16")] if arr.dtype == ml_dtypes.bfloat16 else []
        shard.nodes.append((f"/{entry.path}", len(shard.tensors), attrs))
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


@dataclasses.dataclass(frozen=True)
class _Report:
    """A native `WriteReport`'s fields, for the whole set of shards and the index."""

    paths: list[str]
    bytes: int
    seconds: float
    kept: None = None


class ShardedJob:
    """The shards' writes run in parallel; the index is written once they all succeed, so
    a reader never finds an index that names a missing or partial shard. Same interface
    as a native job."""

    def __init__(self, shard_jobs: list[Any], index_path: str, index: dict, background: bool):
        self._shard_jobs = shard_jobs
        self._index_path = index_path
        self._index = json.dumps(index, indent=4).encode()
        self._started = time.perf_counter()
        self._outcome: _Report | BaseException | None = None
        self._finished = threading.Event()
        if background:
            threading.Thread(target=self._finish, name="fastckpt-shards", daemon=True).start()
        else:
            self._finish()

    def _finish(self) -> None:
        try:
            paths, total = [], 0
            for job in self._shard_jobs:
                report = job.result()
                paths += report.paths
                total += report.bytes
            index = _fastckpt.write_bytes(self._index_path, self._index).result()
            self._outcome = _Report(
                index.paths + paths, total + index.bytes, time.perf_counter() - self._started
            )
        except BaseException as e:  # reported through result()/exception()
            self._outcome = e
        finally:
            self._finished.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._finished.wait(timeout)

    def done(self) -> bool:
        return self._finished.is_set()

    def result(self) -> _Report:
        self._finished.wait()
        if isinstance(self._outcome, BaseException):
            raise self._outcome
        assert self._outcome is not None
        return self._outcome

    def exception(self) -> BaseException | None:
        self._finished.wait()
        return self._outcome if isinstance(self._outcome, BaseException) else None


def start_sharded_write(
    plan: SavePlan,
    arrays: list[np.ndarray],
    index_path: str,
    max_shard_size: float,
    *,
    threads: int | None,
    background: bool,
) -> ShardedJob:
    shards, index = plan_shards(plan, arrays, index_path, max_shard_size)
    folder = os.path.dirname(index_path)
    options = _fastckpt.WriteOptions(threads=threads, background=True)
    jobs = [
        _fastckpt.write_hdf5(os.path.join(folder, s.filename), s.tensors, s.nodes, options=options)
        for s in shards
    ]
    return ShardedJob(jobs, index_path, index, background)
