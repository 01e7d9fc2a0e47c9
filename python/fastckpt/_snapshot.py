"""Stage 2: SavePlan -> host arrays, all taken at the same training step.

This is the only stage on the training thread, so it is built for speed:

- Reading: each backend's reader (`_readers.py`) reaches every variable's current buffer
  without a copy where the backend allows it (TensorFlow, JAX and torch on a CPU), or moves
  them all to the host in one batched transfer where they live on an accelerator (JAX and
  TensorFlow through the CUDA driver, torch with non-blocking copies on a side stream).
- Copying: large variables (on an accelerator: all of them) land in an arena of host
  buffers reused from one save to the next (pinned for device-to-host copies), by every
  core at once with the interpreter released (`_fastckpt.copy_into`): the training thread
  waits for the copy anyway. Small ones are copied one by one.
- Preparing: fresh memory costs far more to write than memory already touched (each page
  is faulted and zeroed first, and on a VM often backed by the host first), so an arena's
  pages are faulted in on a low-priority thread as soon as the arena exists
  (`Snapshotter.prepare`, called when training begins), before the first snapshot needs it.
  Where the plan is not known yet when training begins (TensorFlow builds the optimizer in
  the first step), memory of the size it is expected to need is faulted in meanwhile
  (`warm_block`) and becomes the arena once the plan exists, if it is large enough.
  Pinned memory is resident from the start.
- Taking it into the file: where the save writes into a kept file in memory (a callback's
  checkpoint on tmpfs, `keep_replaced`), whose mapping this process keeps
  (`_fastckpt.kept_region`), large variables are copied straight to their places in that
  file, as the last file planned for the same target laid them out (`Snapshotter.into`):
  the write then copies none of them, and takes next to nothing from training. The write
  checks each one is where its file's layout puts it; where the layout has moved since
  (`Snapshotter.placed`), the save copies them out and plans again.
- Holding: a save that nothing will train past before it is written (a synchronous save,
  or the last checkpoint of a `fit`) holds the variables' own host buffers instead of
  copying. Under TensorFlow that is always safe: it copies a variable's buffer on write
  while a read of it is referenced. Under JAX the next training step donates (frees) the
  buffers, and under torch it updates them in place, so a hold is only ever taken when no
  step can come before the write ends. Values on an accelerator have no host buffer to
  lend: they always go through the arena.
- Other backends, and values that are not variables: `convert_to_numpy`, one by one.

The arrays handed out stay valid until the write that uses them is done: an arena is only
reused once the job it was lent to has finished.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from fastckpt import _fastckpt
from fastckpt._readers import LARGE_BYTES, PAGE, HostBlock, Reader, nbytes, reader_for
from fastckpt._walk import SavePlan

__all__ = [
    "LARGE_BYTES",
    "PAGE",
    "Snapshot",
    "Snapshotter",
    "WarmBlock",
    "arena_bytes",
    "snapshot",
    "snapshotter_for",
    "warm_block",
]


def to_host(value: Any) -> np.ndarray:
    """One value as a C-contiguous host array (bfloat16 stays ml_dtypes.bfloat16)."""
    # Not np.ascontiguousarray: it turns 0-d values into 1-d arrays.
    return np.asarray(keras.ops.convert_to_numpy(value), order="C")


def _page_round(size: int) -> int:
    return -(-size // PAGE) * PAGE


def arena_bytes(sizes: Sequence[int]) -> int:
    """The bytes of an arena holding values of these sizes (each on its own pages)."""
    return sum(map(_page_round, sizes))


@dataclasses.dataclass
class WarmBlock:
    """Memory for an arena whose plan does not exist yet, faulted in meanwhile.

    Attributes:
        host: the memory (pinned memory is resident already: no faulting in).
        prefault: the job faulting its pages in, or None.
    """

    host: HostBlock
    prefault: Any

    @property
    def nbytes(self) -> int:
        return int(self.host.array.nbytes)


def warm_block(size: int, reader: Reader) -> WarmBlock:
    """`size` bytes of the reader's host memory, faulted in on a low-priority thread."""
    host = reader.host_block(max(size, 1))
    job = _fastckpt.prefault(host.array) if size and host.pinned is None else None
    return WarmBlock(host, job)


class _Arena:
    """Host buffers for the large variables of one plan, lent to one write at a time: one
    page-aligned block (from the reader: pinned where the values are on a device, or a
    warm block made before the plan existed, if it is large enough), each variable's
    buffer starting on its own page."""

    def __init__(
        self,
        specs: list[tuple[int, tuple[int, ...], np.dtype]],
        reader: Reader,
        warm: WarmBlock | None = None,
    ) -> None:
        offsets, end = [], 0
        for _, shape, dtype in specs:
            offsets.append(end)
            end += _page_round(nbytes(shape, dtype))
        if warm is None or warm.nbytes < end:
            warm = warm_block(end, reader)
        self.block = warm.host.array
        # Keeps the block pinned (and alive) as long as the arena lives.
        self.pinned = warm.host.pinned
        self.views: dict[int, np.ndarray] = {}
        for (index, shape, dtype), at in zip(specs, offsets, strict=True):
            view = self.block[at : at + nbytes(shape, dtype)]
            self.views[index] = view.view(dtype).reshape(shape)
        # What the reader derives from this arena and keeps between snapshots.
        self.state: dict[str, Any] = {}
        # Faulting the pages in on a low-priority thread; a snapshot that comes first
        # simply faults the rest itself (prefaulting never changes a byte).
        self.prefault = warm.prefault
        self.job: Any = None

    def free(self) -> bool:
        return self.job is None or self.job.done()

    def ready(self) -> bool:
        """Whether the pages are faulted in (the first snapshot into it will be fast)."""
        return self.prefault is None or self.prefault.done()


class _Reserved:
    """Holds an arena between the snapshot and the hand-off to a write job."""

    @staticmethod
    def done() -> bool:
        return False


class Snapshot:
    """Host arrays for one save, in plan order. Its arena stays reserved until `lend_to(job)`
    (then busy until that job is done) or `release()` (the save never started)."""

    def __init__(self, arrays: list[np.ndarray], arena: _Arena | None) -> None:
        self.arrays = arrays
        self._arena = arena

    def lend_to(self, job: Any) -> None:
        if self._arena is not None:
            self._arena.job = job

    def release(self) -> None:
        if self._arena is not None:
            self._arena.job = None


class Snapshotter:
    """Takes snapshots of one plan, reusing what it can between saves."""

    def __init__(self, plan: SavePlan, values: Mapping[int, Any] | None = None) -> None:
        # The entries, not the plan: the plan holds its snapshotter, and a reference back
        # would make the two a cycle that only the garbage collector frees.
        self._entries = plan.entries
        self._arenas: list[_Arena] = []
        # Arenas asked for by each live owner, and without one (see `prepare`).
        self._wanted: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._unowned = 0
        self._lock = threading.Lock()
        self._read: Reader | None = reader_for(plan, values)
        # (entry index, shape, dtype) of the values copied into the arena.
        self._specs: list[tuple[int, tuple[int, ...], np.dtype]] = []
        if self._read is not None:
            least = self._read.arena_min_bytes()
            for i, (e, dtype) in enumerate(zip(plan.entries, self._read.dtypes, strict=True)):
                shape = tuple(e.source.shape)
                if nbytes(shape, dtype) >= least:
                    self._specs.append((i, shape, dtype))
        #: Host memory one snapshot buffer (arena) takes.
        self.buffer_bytes = arena_bytes([nbytes(s, d) for _, s, d in self._specs])
        # Where the last file planned for each target put each value of the arena, by the
        # value's index: its offset in the file (see `into`). A few targets at most.
        self._placed: dict[Hashable, dict[int, int]] = {}

    def prepare(
        self, buffers: int, owner: object = None, warm: Sequence[WarmBlock] = ()
    ) -> list[_Arena]:
        """Makes sure the arenas every owner asked for exist (`buffers` for `owner`, added
        to what the other owners asked: two callbacks of one `fit` each get theirs), their
        pages faulting in on a background thread, so that the first snapshots find their
        memory ready; returns them. New arenas take their memory from `warm` while it
        lasts (a block too small for the arena is dropped)."""
        if self._read is None or not self._specs:
            return []
        blocks = list(warm)
        with self._lock:
            if owner is None:
                self._unowned = max(self._unowned, buffers)
            else:
                self._wanted[owner] = buffers
            wanted = self._unowned + sum(self._wanted.values())
            while len(self._arenas) < wanted:
                block = blocks.pop(0) if blocks else None
                self._arenas.append(_Arena(self._specs, self._read, block))
            return list(self._arenas[:wanted])

    @property
    def reader(self) -> Reader | None:
        """How this plan's values are read (None: one by one, with no arena)."""
        return self._read

    def _arena_for_next(self) -> _Arena:
        """A free arena, reserved for the caller (saves from several threads never share
        one); a new one only when every arena is still lent to a running write."""
        with self._lock:
            arena = next((a for a in self._arenas if a.free()), None)
            if arena is None:
                assert self._read is not None
                arena = _Arena(self._specs, self._read)
                self._arenas.append(arena)
            arena.job = _Reserved()
            return arena

    def into(self, target: Hashable, path: str) -> dict[int, np.ndarray] | None:
        """Views, by value index, of the memory of the kept file `path` that a save of
        `target` writes into (`_fastckpt.kept_region`; the views keep it lent), at the
        places where the last file planned for `target` put each value of the arena; None
        where those are not known, the file's memory is not lent, or the values come from
        a device (they go through the pinned arena)."""
        placed = self._placed.get(target)
        if placed is None or self._read is None or self._read.on_device or not self._specs:
            return None
        if any(i not in placed for i, _, _ in self._specs):
            return None
        end = max(placed[i] + nbytes(shape, dtype) for i, shape, dtype in self._specs)
        region = _fastckpt.kept_region(path, end)
        if region is None:
            return None
        memory = np.asarray(region)
        views = {}
        for index, shape, dtype in self._specs:
            at = placed[index]
            if at % dtype.alignment:
                return None
            views[index] = memory[at : at + nbytes(shape, dtype)].view(dtype).reshape(shape)
        return views

    def placed(
        self, target: Hashable, arrays: Sequence[np.ndarray], slots: Sequence[tuple[int, int, int]]
    ) -> bool:
        """Learns where a file planned for `target` puts each value of the arena, from its
        `slots()` and the arrays it was planned from; returns whether that differs from
        what was known before: a snapshot taken `into()` the file at the places known
        before is then not where the file puts it."""
        offsets = {address: offset for offset, address, _ in slots}
        placed = {}
        for index, _, _ in self._specs:
            at = offsets.get(_address(arrays[index]))
            if at is not None:
                placed[index] = at
        with self._lock:
            moved = self._placed.pop(target, None) != placed
            self._placed[target] = placed
            while len(self._placed) > _TARGETS_PLACED:
                del self._placed[next(iter(self._placed))]
        return moved

    def take(
        self,
        hold: bool = False,
        background: bool = False,
        into: Mapping[int, np.ndarray] | None = None,
    ) -> Snapshot:
        """Host arrays of every value, copied into a free arena (or into `into`, views by
        value index of a kept file's memory, from `into()`), or with `hold` the backend's
        own host buffers: always for a synchronous save (nothing steps before it returns),
        for a background one only where they outlive training steps."""
        read = self._read
        if read is None:
            return Snapshot([to_host(e.source) for e in self._entries], None)
        if into is not None:
            return Snapshot(read.read_into(dict(into), {}), None)
        lend = hold and not read.on_device and (not background or read.views_outlive_steps)
        if not self._specs or lend:
            arrays = read()
            if not lend and not read.views_outlive_steps:
                arrays = [np.array(a) for a in arrays]
            return Snapshot(arrays, None)
        arena = self._arena_for_next()
        try:
            views = {i: arena.views[i] for i, _, _ in self._specs}
            return Snapshot(read.read_into(views, arena.state), arena)
        except BaseException:
            arena.job = None
            raise


# Targets whose layout a snapshotter remembers (a callback's checkpoint and its backup's).
_TARGETS_PLACED = 4


def _address(array: np.ndarray) -> int:
    address: int = array.__array_interface__["data"][0]
    return address


# Snapshotters are made on the training thread and on the callbacks' readying thread.
_MAKING = threading.Lock()


def snapshotter_for(plan: SavePlan, values: Mapping[int, Any] | None = None) -> Snapshotter:
    """The snapshotter of a plan, made once and reused while the plan is (it is kept on the
    plan: a cache keyed by the plan would keep it alive through the snapshotter); `values`
    (`_readers.current_values`) to make it off the training thread."""
    if plan.snapshotter is None:
        with _MAKING:
            if plan.snapshotter is None:
                plan.snapshotter = Snapshotter(plan, values)
    snapper: Snapshotter = plan.snapshotter
    return snapper


def snapshot(
    plan: SavePlan,
    *,
    hold: bool = False,
    background: bool = False,
    into: Mapping[int, np.ndarray] | None = None,
) -> Snapshot:
    """Host arrays of every value in the plan, in plan order.

    With `hold` (for a save that no training step will pass before it is written: a
    synchronous save, or the last checkpoint of a `fit`), large variables are lent as the
    backend's own buffers instead of copied into the arena, where that is safe: no copy
    and no arena memory. A background save during training must not hold (README,
    "Choosing the snapshot"). `into`: see `Snapshotter.take`.
    """
    return snapshotter_for(plan).take(hold, background, into)
