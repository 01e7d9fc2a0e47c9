"""Which process of a multi-process training this is, and the collectives fastckpt needs.

Keras 3 trains on many processes (and hosts) with `keras.distribution` over
`jax.distributed`: every process runs the same script, so every process calls the same
callbacks and `fastckpt.save` at the same points. A checkpoint is then written once, by
process 0, into the folder the processes share; the others take the same decisions (they
agree on process 0's monitored value), skip the write, and meet process 0 where a write
must be visible to them all (after `fastckpt.save`, at the end of `fit`, after a restore).

Process 0 can write a variable only if it holds all of it: with `DataParallel` (and any
layout that replicates each variable on every process) it does; a variable a
`ModelParallel` layout splits over processes is refused before anything is written, on
every process alike.

On TensorFlow, Keras 3's multi-process path (`MultiWorkerMirroredStrategy`) does not
train (see the README); `MirroredStrategy` is one process, and so are the other backends
here.
"""

from __future__ import annotations

import os
from typing import Any

import keras
import numpy as np

from fastckpt.formats.process_shards import Block


def count() -> int:
    """How many processes train together (1 unless `jax.distributed` set up more)."""
    if keras.backend.backend() != "jax":
        return 1
    import jax

    return int(jax.process_count())


def index() -> int:
    """This process's index among them (0 when alone)."""
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return int(jax.process_index())


def is_writer() -> bool:
    """Whether this process writes the checkpoints: process 0."""
    return index() == 0


def barrier(name: str) -> None:
    """Returns once every process has called it with the same `name`."""
    if count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def agree(value: float) -> float:
    """Process 0's `value`, on every process: the monitored metric a decision to save is
    taken on, so that no two processes can decide differently."""
    if count() == 1:
        return value
    from jax.experimental import multihost_utils

    # As two 32-bit words: JAX without x64 would round a float64 to float32.
    words = np.frombuffer(np.float64(value).tobytes(), np.uint32)
    got = np.asarray(multihost_utils.broadcast_one_to_all(words), np.uint32)
    return float(np.frombuffer(got.tobytes(), np.float64)[0])


def settle(what: str, error: BaseException | None) -> None:
    """Every process's end of `what` (a collective): raises this process's `error`, and
    on the other processes a `CheckpointError` if process 0 had one, so that no process
    goes on as if process 0's files were written (nor waits for it forever)."""
    if count() > 1:
        ok = agree(0.0 if error is not None else 1.0)
        if error is None and not ok:
            from fastckpt._errors import CheckpointError

            raise CheckpointError(
                f"{what}: process 0 could not write the checkpoint (its error is in its "
                "own output); the previous files, if any, are intact"
            )
    if error is not None:
        raise error


def token() -> str:
    """A name for one save, the same on every process (process 0's, random)."""
    mine = np.frombuffer(os.urandom(8), np.uint32)
    if count() > 1:
        from jax.experimental import multihost_utils

        mine = np.asarray(multihost_utils.broadcast_one_to_all(mine), np.uint32)
    return mine.astype("<u4").tobytes().hex()


def outcomes(ok: bool) -> list[bool]:
    """Every process's `ok`, in process order, on every process (a collective)."""
    if count() == 1:
        return [ok]
    from jax.experimental import multihost_utils

    got = multihost_utils.process_allgather(np.array([1 if ok else 0], np.int32))
    return [bool(x) for x in np.asarray(got).reshape(-1)]


def blocks(value: Any) -> list[Block]:
    """The parts a value is saved as by every process together (`.shards.json`), and which
    process writes each: one part for each distinct block of the value its devices hold,
    written by the process of the first device holding it (lowest process, then device
    id), so that each element is written once; a host value is one part, process 0's.
    Every process computes the same parts."""
    shape = tuple(int(n) for n in value.shape)
    sharding = getattr(value, "sharding", None)
    if sharding is None:
        return [Block((0,) * len(shape), shape, 0)]
    holders: dict[tuple[tuple[int, ...], tuple[int, ...]], list[Any]] = {}
    for device, index in sharding.devices_indices_map(shape).items():
        bounds = [i.indices(n) for i, n in zip(index, shape, strict=True)]
        start = tuple(b[0] for b in bounds)
        size = tuple(len(range(*b)) for b in bounds)
        holders.setdefault((start, size), []).append(device)
    out = []
    for (start, size), devices in holders.items():
        first = min(devices, key=lambda d: (d.process_index, d.id))
        out.append(Block(start, size, int(first.process_index)))
    return sorted(out, key=lambda b: b.start)


def block_data(value: Any, block: Block) -> np.ndarray:
    """This process's copy of `block` of `value` (a host array, C-contiguous)."""
    sharding = getattr(value, "sharding", None)
    if sharding is None or sharding.is_fully_replicated:
        # (Not `addressable_shards`: a replicated value as Keras first lays it out over
        # several processes lists its local copy as an array of many devices, which it
        # refuses; the local copy is its value.)
        return np.asarray(value, order="C")  # (np.ascontiguousarray makes 0-d 1-d)
    for shard in value.addressable_shards:
        bounds = [i.indices(n) for i, n in zip(shard.index, value.shape, strict=True)]
        if (
            tuple(b[0] for b in bounds) == block.start
            and tuple(len(range(*b)) for b in bounds) == block.shape
        ):
            return np.asarray(shard.data, order="C")
    raise AssertionError(f"no device of process {index()} holds block {block.start}")


def check_whole_on_writer(entries: list[Any]) -> None:
    """Raises, naming the variable, if process 0 does not hold all of some variable to be
    saved (identical on every process: the layout is the same everywhere)."""
    if count() == 1:
        return
    for entry in entries:
        value = getattr(entry.source, "value", entry.source)
        if not _held_whole(value):
            raise ValueError(
                f"{entry.path}: sharded over {count()} processes "
                f"({getattr(value, 'sharding', None)}); this format is written by process "
                "0 alone, which holds only part of it. Save to a `.shards.json` path, "
                "which every process writes its parts of (`fastckpt convert` turns it into "
                "a `.weights.h5` file afterwards), or replicate the variables "
                "(DataParallel)"
            )


def _held_whole(value: Any) -> bool:
    """Whether this process can read all of `value` (a `jax.Array` or a host value)."""
    sharding = getattr(value, "sharding", None)
    if sharding is None or value.is_fully_addressable or sharding.is_fully_replicated:
        return True
    # Replicated over some devices only: whole here if one of this process's devices
    # holds a whole copy.
    shape = tuple(value.shape)
    return any(tuple(index_shape) == shape for index_shape in _local_shapes(value))


def _local_shapes(value: Any) -> list[tuple[int, ...]]:
    """The shapes of the pieces of `value` this process's devices hold."""
    local = set(value.sharding.addressable_devices)
    shapes = []
    for device, index in value.sharding.devices_indices_map(tuple(value.shape)).items():
        if device in local:
            shapes.append(
                tuple(len(range(*i.indices(n))) for i, n in zip(index, value.shape, strict=True))
            )
    return shapes
