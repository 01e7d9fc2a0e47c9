"""Stage 2: SavePlan -> host arrays, all taken at the same training step.

This is the only stage on the training thread, so it is built for speed:

- TensorFlow: one `ReadVariableOp` per variable through the eager fast path (~14 us, against
  ~160 us for Keras's `convert_to_numpy`; a `tf.function` reading them all would be one
  call, but tracing it takes minutes for thousands of variables). Small variables are
  copied out by `.numpy()`. Large ones are copied into an arena of host buffers reused from
  one save to the next (a copy into memory already touched runs several times faster than
  into fresh memory, and releasing the variables' buffers at once spares the next training
  step TensorFlow's copy-on-write: README, "Choosing the snapshot"). A synchronous save
  holds the variables' own buffers instead: nothing can write them before it returns.
- Other backends, and values that are not variables: `convert_to_numpy`, one by one.

The arrays handed out stay valid until the write that uses them is done: an arena is only
reused once the job it was lent to has finished.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np
from keras.src import backend

from fastckpt._readers import numpy_dtype
from fastckpt._walk import SavePlan

# Variables at least this large are copied into the reused arena; smaller ones are
# gathered into one buffer per dtype.
LARGE_BYTES = 256 << 10
# Arena buffers start on a page, so the writer can send them to disk with direct I/O
# without going through a bounce buffer.
PAGE = 4096


def to_host(value: Any) -> np.ndarray:
    """One value as a C-contiguous host array (bfloat16 stays ml_dtypes.bfloat16)."""
    # Not np.ascontiguousarray: it turns 0-d values into 1-d arrays.
    return np.asarray(backend.convert_to_numpy(value), order="C")


class _Arena:
    """Host buffers for the large variables of one plan, lent to one write at a time."""

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.job: Any = None

    def free(self) -> bool:
        return self.job is None or self.job.done()

    def buffer(self, index: int, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        buf = self.buffers.get(index)
        if buf is None or buf.shape != shape or buf.dtype != dtype:
            buf = _page_aligned(shape, dtype)
            buf.fill(0)  # touch the pages now, once, not during a later snapshot
            self.buffers[index] = buf
        return buf


def _page_aligned(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a page boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + PAGE, np.uint8)
    skip = -raw.ctypes.data % PAGE
    return raw[skip : skip + nbytes].view(dtype).reshape(shape)


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

    def __init__(self, plan: SavePlan) -> None:
        self.plan = plan
        self._arenas: list[_Arena] = []
        self._lock = threading.Lock()
        self._read: Callable[[_Arena | None], list[np.ndarray]] | None = None
        if backend.backend() == "tensorflow" and not plan.dynamic:
            self._read = _TensorFlowReader(plan)

    def _arena_for_next(self) -> _Arena:
        """A free arena, reserved for the caller (saves from several threads never share
        one); a new one only when every arena is still lent to a running write."""
        with self._lock:
            arena = next((a for a in self._arenas if a.free()), None)
            if arena is None:
                arena = _Arena()
                self._arenas.append(arena)
            arena.job = _Reserved()
            return arena

    def take(self, hold: bool = False) -> Snapshot:
        if self._read is None:
            return Snapshot([to_host(e.source) for e in self.plan.entries], None)
        if hold:
            return Snapshot(self._read(None), None)
        arena = self._arena_for_next()
        try:
            return Snapshot(self._read(arena), arena)
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
            return np.from_dlpack(_DLPack(tensor))
    except (TypeError, ValueError, RuntimeError, BufferError):
        pass
    return tensor.numpy()


class _TensorFlowReader:
    """Reads every variable of a plan with TensorFlow's fast-path eager op.

    A `tf.function` over thousands of variables would read them in one call, but tracing
    it takes minutes (quadratic in captures, TF 2.21). One `ReadVariableOp` per variable
    through the eager fast path costs ~14 us, an order of magnitude below Keras's path.
    """

    def __init__(self, plan: SavePlan) -> None:
        from tensorflow.python.ops import gen_resource_variable_ops

        self._read_op = gen_resource_variable_ops.read_variable_op
        tf_vars = [e.source.value for e in plan.entries]
        self._handles = [(v.handle, v.dtype) for v in tf_vars]
        self._shapes = [tuple(v.shape) for v in tf_vars]
        self._dtypes = [
            numpy_dtype(backend.standardize_dtype(e.source.dtype)) for e in plan.entries
        ]
        self._large = [
            int(np.prod(s, dtype=np.int64)) * d.itemsize >= LARGE_BYTES
            for s, d in zip(self._shapes, self._dtypes, strict=True)
        ]

    def __call__(self, arena: _Arena | None) -> list[np.ndarray]:
        read = self._read_op
        values = [read(handle, dtype) for handle, dtype in self._handles]
        out = []
        for i, (tensor, large) in enumerate(zip(values, self._large, strict=True)):
            if large and arena is None:
                # Held, not copied: the read tensor keeps the buffer alive and unchanged
                # (TensorFlow copies a variable's buffer on write while it is referenced).
                out.append(_host_view(tensor).reshape(self._shapes[i]))
            elif large:
                dest = arena.buffer(i, self._shapes[i], self._dtypes[i])
                np.copyto(dest, _host_view(tensor).reshape(self._shapes[i]), casting="no")
                out.append(dest)
            else:
                out.append(np.asarray(tensor.numpy(), order="C"))
        return out


_snapshotters: weakref.WeakKeyDictionary[SavePlan, Snapshotter] = weakref.WeakKeyDictionary()


def snapshotter_for(plan: SavePlan) -> Snapshotter:
    """The snapshotter of a plan, made once and reused while the plan is."""
    snap = _snapshotters.get(plan)
    if snap is None:
        snap = _snapshotters[plan] = Snapshotter(plan)
    return snap


def snapshot(plan: SavePlan, *, hold: bool = False) -> Snapshot:
    """Host arrays of every value in the plan, in plan order.

    With `hold` (for a save that blocks its caller until the file is written), large
    TensorFlow variables are lent as views of their own buffers instead of copied into the
    arena: no copy and no arena memory, and since training cannot step before the save
    returns and drops the views, no copy-on-write lands on the next step either. A
    background save must not hold: the next step would pay that copy (README, "Choosing
    the snapshot").
    """
    return snapshotter_for(plan).take(hold)
