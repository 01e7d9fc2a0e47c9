"""Stage 2: SavePlan -> host arrays, all taken at the same training step.

This is the only stage on the training thread, so it is built for speed:

- Reading: every variable's current buffer is reached without a copy where the backend
  allows it. TensorFlow: one `ReadVariableOp` per variable through the eager fast path
  (~14 us, against ~160 us for Keras's `convert_to_numpy`; a `tf.function` reading them all
  would be one call, but tracing it takes minutes for thousands of variables), then a
  DLPack view of the CPU buffer. JAX: every device-to-host transfer is started before any
  is waited for (`copy_to_host_async`), then each array is viewed as numpy (on a CPU
  device, its own buffer).
- Copying: large variables are copied into an arena of host buffers reused from one save
  to the next, by every core at once with the interpreter released (`_fastckpt.copy_into`):
  the training thread waits for the copy anyway. Small ones are copied one by one.
- Preparing: fresh memory costs far more to write than memory already touched (each page
  is faulted and zeroed first, and on a VM often backed by the host first), so an arena's
  pages are faulted in on a low-priority thread as soon as the arena exists
  (`Snapshotter.prepare`, called when training begins), before the first snapshot needs it.
- Holding: a save that nothing will train past before it is written (a synchronous save,
  or the last checkpoint of a `fit`) holds the variables' own buffers instead of copying.
  Under TensorFlow that is always safe: it copies a variable's buffer on write while a
  read of it is referenced. Under JAX the next training step donates (frees) the buffers,
  so a hold is only ever taken when no step can come before the write ends.
- Other backends, and values that are not variables: `convert_to_numpy`, one by one.

The arrays handed out stay valid until the write that uses them is done: an arena is only
reused once the job it was lent to has finished.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import keras
import numpy as np

from fastckpt import _fastckpt, _keras_private
from fastckpt._walk import SavePlan
from fastckpt.formats import numpy_dtype

# Variables at least this large are copied into the reused arena; smaller ones are copied
# one by one.
LARGE_BYTES = 256 << 10
# Arena buffers start on a page, so the writer can send them to disk with direct I/O
# without going through a bounce buffer.
PAGE = 4096


def to_host(value: Any) -> np.ndarray:
    """One value as a C-contiguous host array (bfloat16 stays ml_dtypes.bfloat16)."""
    # Not np.ascontiguousarray: it turns 0-d values into 1-d arrays.
    return np.asarray(keras.ops.convert_to_numpy(value), order="C")


def _page_aligned(nbytes: int) -> np.ndarray:
    """An uninitialised byte buffer that starts on a page boundary."""
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip : skip + nbytes]


def _nbytes(shape: tuple[int, ...], dtype: np.dtype) -> int:
    return int(np.prod(shape, dtype=np.int64)) * dtype.itemsize


class _Arena:
    """Host buffers for the large variables of one plan, lent to one write at a time: one
    page-aligned block, each variable's buffer starting on its own page."""

    def __init__(self, specs: list[tuple[int, tuple[int, ...], np.dtype]]) -> None:
        offsets, end = [], 0
        for _, shape, dtype in specs:
            offsets.append(end)
            end += -(-_nbytes(shape, dtype) // PAGE) * PAGE
        self.block = _page_aligned(max(end, 1))
        self.views: dict[int, np.ndarray] = {}
        for (index, shape, dtype), at in zip(specs, offsets, strict=True):
            view = self.block[at : at + _nbytes(shape, dtype)]
            self.views[index] = view.view(dtype).reshape(shape)
        # Faulting the pages in on a low-priority thread; a snapshot that comes first
        # simply faults the rest itself (prefaulting never changes a byte).
        self.prefault = _fastckpt.prefault(self.block) if end else None
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


class Reader:
    """Reads every value of a plan as host arrays; `dtypes[i]` is the dtype of value i as
    read (under JAX with x64 off, a float64 variable holds float32 values).
    `views_outlive_steps`: whether the arrays read stay valid whatever the model does next
    (else only until the next training or evaluation step)."""

    dtypes: list[np.dtype]
    views_outlive_steps = False

    def __call__(self) -> list[np.ndarray]:
        raise NotImplementedError


class Snapshotter:
    """Takes snapshots of one plan, reusing what it can between saves."""

    def __init__(self, plan: SavePlan) -> None:
        # The entries, not the plan: the plan holds its snapshotter, and a reference back
        # would make the two a cycle that only the garbage collector frees.
        self._entries = plan.entries
        self._arenas: list[_Arena] = []
        # Arenas asked for by each live owner, and without one (see `prepare`).
        self._wanted: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()
        self._unowned = 0
        self._lock = threading.Lock()
        self._read: Reader | None = None
        if not plan.dynamic:
            name = keras.backend.backend()
            if name == "tensorflow":
                self._read = _TensorFlowReader(plan)
            elif name == "jax":
                self._read = _JaxReader(plan)
        # (entry index, shape, dtype) of the values copied into the arena.
        self._specs: list[tuple[int, tuple[int, ...], np.dtype]] = []
        if self._read is not None:
            for i, (e, dtype) in enumerate(zip(plan.entries, self._read.dtypes, strict=True)):
                shape = tuple(e.source.shape)
                if _nbytes(shape, dtype) >= LARGE_BYTES:
                    self._specs.append((i, shape, dtype))
        #: Host memory one snapshot buffer (arena) takes.
        self.buffer_bytes = sum(-(-_nbytes(s, d) // PAGE) * PAGE for _, s, d in self._specs)

    def prepare(self, buffers: int, owner: object = None) -> list[_Arena]:
        """Makes sure the arenas every owner asked for exist (`buffers` for `owner`, added
        to what the other owners asked: two callbacks of one `fit` each get theirs), their
        pages faulting in on a background thread, so that the first snapshots find their
        memory ready; returns them."""
        if self._read is None or not self._specs:
            return []
        with self._lock:
            if owner is None:
                self._unowned = max(self._unowned, buffers)
            else:
                self._wanted[owner] = buffers
            wanted = self._unowned + sum(self._wanted.values())
            while len(self._arenas) < wanted:
                self._arenas.append(_Arena(self._specs))
            return list(self._arenas[:wanted])

    def _arena_for_next(self) -> _Arena:
        """A free arena, reserved for the caller (saves from several threads never share
        one); a new one only when every arena is still lent to a running write."""
        with self._lock:
            arena = next((a for a in self._arenas if a.free()), None)
            if arena is None:
                arena = _Arena(self._specs)
                self._arenas.append(arena)
            arena.job = _Reserved()
            return arena

    def take(self, hold: bool = False, background: bool = False) -> Snapshot:
        """Host arrays of every value, copied into a free arena, or with `hold` the
        backend's own buffers: always for a synchronous save (nothing steps before it
        returns), for a background one only where they outlive training steps."""
        if self._read is None:
            return Snapshot([to_host(e.source) for e in self._entries], None)
        arrays = self._read()
        if not self._specs or (hold and (not background or self._read.views_outlive_steps)):
            return Snapshot(arrays, None)
        arena = self._arena_for_next()
        try:
            pairs = []
            for i, _, _ in self._specs:
                dest = arena.views[i]
                pairs.append((arrays[i], dest))
                arrays[i] = dest
            _fastckpt.copy_into(pairs)
            return Snapshot(arrays, arena)
        except BaseException:
            arena.job = None
            raise


class _DLPack:
    """Adapts TensorFlow's DLPack capsule to numpy's `from_dlpack` protocol."""

    def __init__(self, tensor: Any) -> None:
        self._tensor = tensor

    def __dlpack__(self, *args: Any, **kwargs: Any) -> Any:
        import tensorflow as tf

        return tf.experimental.dlpack.to_dlpack(self._tensor)

    def __dlpack_device__(self) -> tuple[int, int]:
        return (1, 0)  # kDLCPU


def _host_view(tensor: Any) -> np.ndarray:
    """A numpy view of a CPU tensor's buffer without a copy, or a copy where DLPack
    cannot express the dtype (bfloat16) or the tensor lives on an accelerator."""
    try:
        if "CPU" in tensor.device:
            view: np.ndarray = np.from_dlpack(_DLPack(tensor))
            return view
    except (TypeError, ValueError, RuntimeError, BufferError):
        pass
    return np.asarray(tensor.numpy())


def _first_replica(variable: Any) -> Any:
    """The variable itself, or under a `tf.distribute` strategy (`MirroredStrategy`) its
    first replica's copy: replicas are kept equal on every update, and a save holds one."""
    import tensorflow as tf

    if isinstance(variable, tf.distribute.DistributedValues):
        return variable.distribute_strategy.experimental_local_results(variable)[0]
    return variable


class _TensorFlowReader(Reader):
    """Reads every variable of a plan with TensorFlow's fast-path eager op: large ones as
    views of their buffers (TensorFlow copies a variable's buffer on write while a read of
    it is referenced, so a view keeps the value of the snapshot), small ones as copies."""

    views_outlive_steps = True

    def __init__(self, plan: SavePlan) -> None:
        self._read_op = _keras_private.tf_read_variable_op()
        tf_vars = [_first_replica(e.source.value) for e in plan.entries]
        self._handles = [(v.handle, v.dtype) for v in tf_vars]
        self._shapes = [tuple(v.shape) for v in tf_vars]
        self.dtypes = [
            numpy_dtype(keras.backend.standardize_dtype(e.source.dtype)) for e in plan.entries
        ]
        self._large = [
            _nbytes(s, d) >= LARGE_BYTES for s, d in zip(self._shapes, self.dtypes, strict=True)
        ]

    def __call__(self) -> list[np.ndarray]:
        read = self._read_op
        values = [read(handle, dtype) for handle, dtype in self._handles]
        out = []
        for tensor, shape, large in zip(values, self._shapes, self._large, strict=True):
            if large:
                out.append(_host_view(tensor).reshape(shape))
            else:
                out.append(np.asarray(tensor.numpy(), order="C"))
        return out


class _JaxReader(Reader):
    """Reads every variable of a plan under JAX: all device-to-host transfers are started
    before any is waited for, then each array is viewed as numpy (on a CPU device, its own
    buffer, which stays valid only until the next training or evaluation step donates it:
    Keras's jitted steps donate the state they are given)."""

    def __init__(self, plan: SavePlan) -> None:
        self._variables = [e.source for e in plan.entries]
        self.dtypes = [np.dtype(v.value.dtype) for v in self._variables]

    def __call__(self) -> list[np.ndarray]:
        values = [v.value for v in self._variables]
        for value in values:
            value.copy_to_host_async()
        return [np.asarray(value, order="C") for value in values]


def snapshotter_for(plan: SavePlan) -> Snapshotter:
    """The snapshotter of a plan, made once and reused while the plan is (it is kept on the
    plan: a cache keyed by the plan would keep it alive through the snapshotter)."""
    if plan.snapshotter is None:
        plan.snapshotter = Snapshotter(plan)
    snapper: Snapshotter = plan.snapshotter
    return snapper


def snapshot(plan: SavePlan, *, hold: bool = False, background: bool = False) -> Snapshot:
    """Host arrays of every value in the plan, in plan order.

    With `hold` (for a save that no training step will pass before it is written: a
    synchronous save, or the last checkpoint of a `fit`), large variables are lent as the
    backend's own buffers instead of copied into the arena, where that is safe: no copy
    and no arena memory. A background save during training must not hold (README,
    "Choosing the snapshot").
    """
    return snapshotter_for(plan).take(hold, background)
