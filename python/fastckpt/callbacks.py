"""`ModelCheckpoint`: `keras.callbacks.ModelCheckpoint` (Keras 3.12-3.15), saving in the
background.

The decisions (when to save, which file name, what to print, which warnings) copy Keras's
`keras/src/callbacks/model_checkpoint.py` line by line, reusing Keras's `MonitorCallback` for
the monitor's direction and the `best` value. Only the write differs: the training thread
takes a snapshot of the variables and hands it to fastckpt's writer, which makes the file
durable in the background while training goes on.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import dataclasses
import numbers
import os
import string
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import keras
import numpy as np

from fastckpt import (
    _fastckpt,
    _keras_private,
    _processes,
    _readers,
    _snapshot,
    _training_state,
    api,
    formats,
)
from fastckpt._keras_private import MonitorCallbackBase, print_msg

# How long one wait for a background save may block before Python gets to run signal
# handlers again: a Ctrl-C must always be able to interrupt a wait.
_WAIT_SLICE_S = 0.25

# Saves handed to the writer and not yet collected, over all callbacks: waited for at
# interpreter exit, so that a checkpoint started just before an exception ends the program
# still lands (a second Ctrl-C abandons it; the target then keeps its previous content).
_IN_FLIGHT: set[api.SaveJob] = set()


def _track(handle: api.SaveJob) -> None:
    """Adds a save to `_IN_FLIGHT`, first dropping the saves there that ended well or were
    cancelled: a `fit` that raised never collects its saves, and the set must not keep
    them for the life of the process (a failed one stays, for the report at exit)."""
    for ended in [h for h in _IN_FLIGHT if h.done()]:
        error = ended.exception()
        if error is None or isinstance(error, concurrent.futures.CancelledError):
            _IN_FLIGHT.discard(ended)
    _IN_FLIGHT.add(handle)


@dataclasses.dataclass
class _Spare:
    """A file a save can write into instead of a new one (see `ModelCheckpoint._spares`):
    one that an earlier save replaced, or one reserved ahead, still being filled while
    `reserving` runs (a write that uses it is queued behind that job)."""

    path: str
    reserving: _fastckpt.Job | None = None

    def usable(self) -> bool:
        """False once its reservation failed: it left no file behind."""
        job = self.reserving
        return job is None or not job.done() or job.exception() is None

    def readiness(self) -> int:
        """0: ready to write into; 1: being reserved; 2: reservation not begun."""
        job = self.reserving
        return 0 if job is None or job.done() else 1 if job.begun() else 2


@dataclasses.dataclass
class _Save:
    """A save this callback started: what to report when it is done."""

    epoch: int
    filepath: str
    handle: api.SaveJob | api.SaveResult
    # The kept file this save writes into (see `ModelCheckpoint._spares`).
    reuse: _Spare | None = None

    def done(self) -> bool:
        return not isinstance(self.handle, api.SaveJob) or self.handle.done()


class _Readying:
    """The readying of one `fit`'s first saves (`ModelCheckpoint._prepare`): tasks run in
    the order queued on one thread for the whole process, at the interpreter's normal
    priority (a low-priority thread descheduled while it holds the interpreter's lock
    would stall the training thread). A task's own work is short: what takes long,
    faulting memory in and reserving files, it hands to fastckpt's low-priority native
    threads. A task returns None, or what it hands over to the callback
    (`ModelCheckpoint._ready`); the fields are the tasks' own until they have ended.

    When several processes train together, every task runs on the training thread, as
    the hook asks for it: Keras's traversal may create variables (reference objects it
    inspects), and under a `keras.distribution` creating one is a collective of every
    process, so it must come at the same point of training on all of them."""

    def __init__(self) -> None:
        self._futures: list[concurrent.futures.Future[Any]] = []
        self._inline = _processes.count() > 1
        # Memory readied before the plan existed (`_warm_up`); the snapshot buffers'
        # faulting-in jobs (`_ready_buffers`).
        self.warm: list[_snapshot.WarmBlock] = []
        self.prefaults: list[_fastckpt.Job] = []

    def queue(self, task: Callable[..., Any], *args: Any, here: bool = False) -> None:
        """Runs `task(self, *args)` on the readying thread, or with `here` on this thread
        once the tasks queued before it have ended (for one that reads the variables'
        values where only the training thread may: `_readers.values_readable_off_thread`)."""
        if not (here or self._inline):
            self._futures.append(_readying_thread().submit(task, self, *args))
            return
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()
        self.wait()
        try:
            done.set_result(task(self, *args))
        except Exception as e:
            done.set_exception(e)
        self._futures.append(done)

    def wait(self) -> None:
        """Waits for every task queued so far."""
        concurrent.futures.wait(self._futures)

    def take(self) -> list[concurrent.futures.Future[Any]]:
        """Waits for every task queued so far; returns them, forgotten here."""
        self.wait()
        futures, self._futures = self._futures, []
        return futures


def _warm_up(readying: _Readying, model: keras.Model, buffers: int) -> None:
    readying.warm = api.warm_up(model, buffers=buffers)


def _ready_buffers(
    readying: _Readying,
    model: keras.Model,
    buffers: int,
    owner: object,
    values: Mapping[int, Any] | None,
    format: formats.Format,
) -> None:
    arenas = api.prepare(
        model, buffers=buffers, owner=owner, warm=readying.warm, values=values, format=format
    )
    readying.warm = []
    readying.prefaults = [a.prefault for a in arenas if a.prefault is not None]


def _reserve_first(
    readying: _Readying, model: keras.Model, path: str
) -> Callable[[ModelCheckpoint], None]:
    """A file beside `path` for the first save to write into, reserved once the snapshot
    buffers are ready; when the file is new, the first save replaces nothing, so the
    second save gets a file reserved too, once the first is written
    (`ModelCheckpoint._reserve_second`: not beside the first snapshot, whose copy would
    share the machine with it)."""
    new = not os.path.exists(path)
    reserved = api.reserve_spares(model, path, 1, after=readying.prefaults)

    def hand_over(callback: ModelCheckpoint) -> None:
        callback._second_spare = new
        for spare, job in reserved:
            callback._keep_spare(path, _Spare(os.fspath(spare), job))

    return hand_over


_READYING: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None


def _readying_thread() -> concurrent.futures.ThreadPoolExecutor:
    """The readying thread of this process (a forked child gets its own: the parent's
    thread does not exist there), started the first time it is asked for: by a callback
    made, not in a hook, since starting a thread waits until it runs."""
    global _READYING
    if _READYING is None or _READYING[0] != os.getpid():
        executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fastckpt-readying")
        executor.submit(lambda: None)
        _READYING = (os.getpid(), executor)
    return _READYING[1]


class ModelCheckpoint(MonitorCallbackBase):
    """Saves the Keras model or its weights at some frequency, in the background.

    A drop-in for `keras.callbacks.ModelCheckpoint` as the installed Keras (3.12 to 3.15)
    has it: the same arguments, file names, decisions, messages and warnings, and files that
    stock Keras loads. On each
    save the training thread only copies the variables to host memory; fastckpt writes the
    file in the background to a temp file beside the target, fsyncs it and renames it into
    place, so a checkpoint on disk is always complete.

    - Saves are written one after another, in the order they were taken. At most
      `snapshot_buffers` snapshots are held at once (one being written, the others
      queued), so host memory stays bounded; a save that finds them all taken waits for
      the oldest, whose write then runs on every core. A queued save whose write has not
      begun is dropped when a newer save to the same file comes (never for another file).
    - Before the first save is due, while training runs, a thread of fastckpt's own
      plans the save (Keras's traversal of the model) and allocates the snapshot
      buffers, whose memory is faulted in on a low-priority thread, and for a file name
      without `{...}` fields room is reserved beside it, so the first checkpoint pauses
      training no longer than the later ones.
    - A save that replaces a file keeps the old one under a hidden temp name, and the next
      save of that file writes into it (no memory or blocks to allocate again); the kept
      files are removed when training ends. The last checkpoint of a `fit` is written
      from the variables' own buffers where the backend allows it (TensorFlow).
    - When `fit()` returns, every checkpoint it asked for is durable (`on_train_end`
      waits); `wait_until_finished()` does the same on demand.
    - A background save that failed raises its error at the next callback hook (end of a
      batch, an epoch or training), so `fit()` raises it.
    - With `verbose=1` the messages are Keras's own, word for word; the line
      `Epoch N: finished saving model to PATH` gets the size and duration of the save
      appended, e.g. `(1.02 GiB in 0.41 s)`. In the background it is printed when the
      save is found finished, at a later hook, so it may follow later lines.

    Args:
        filepath: string or `PathLike`, where to save. It can hold named formatting
            options, filled with `epoch` (1-based), `batch` (1-based, for batch-level
            saves) and the keys of `logs`, e.g. `"{epoch:02d}-{val_loss:.2f}.keras"`.
            With `save_weights_only=True` it must end in `.weights.h5`, `.safetensors`
            or `.shards.json`; otherwise in `.keras`, `.h5` or `.safetensors`. As in
            Keras, `x.weights.h5` with `save_weights_only=False` holds a legacy
            full-model h5. A `.safetensors` file holds the weights (and optimizer state)
            under their `.weights.h5` names, plus the model config unless
            `save_weights_only=True`. A `.shards.json` save is the one for layouts that
            split a variable over processes (`ModelParallel`): every process writes the
            parts it holds, and the save is synchronous (README "Many processes").
        monitor: the metric to monitor, e.g. `"val_loss"`, `"val_accuracy"`.
        verbose: 0 is silent, 1 prints a message when the callback takes an action.
        save_best_only: only save when the model is the best so far by `monitor`. If the
            file name has no formatting options, each new best overwrites the file.
        save_weights_only: save only the weights (and optimizer state), as
            `model.save_weights`; otherwise the whole model, as `model.save`.
        mode: `"auto"`, `"min"` or `"max"`: whether `monitor` improves by going down or
            up. `"auto"` infers it from the name (`loss`) or the compiled metric.
        save_freq: `"epoch"`, or an integer: save every that many batches (counted
            across epochs; with `steps_per_execution=N` it is checked every N batches).
        initial_value_threshold: the initial "best" value of `monitor`, for
            `save_best_only`.
        max_to_keep: keep only this many of the files this callback wrote, the newest
            (with `save_best_only`, the best); older ones are deleted off the training
            thread. Files this callback did not write are never touched. `None` keeps all.
        save_on_background: `True` writes each save in the background (the hook copies
            the state to host memory and returns); `False` writes it in the hook, on
            every core, like Keras but faster. `None` (the default) is `True`, except
            under PyTorch with the model on the CPU: there a background writer, even at
            the lowest priority, slows every training step (torch's OpenMP threads wait
            at each operation for the one the writer displaced) by more than the write
            takes, so the write is done in the hook (README "Backends and devices").
        snapshot_buffers: how many snapshots of the model's state may be held in host
            memory at once, each one copy of the saved state (the weights and optimizer
            variables). 1 (the default) makes a save wait for the previous write; 2 lets
            training go on while one write runs and another waits its turn, which pays
            when checkpoints come faster than a write ends.
        threads: writer threads per save (default: one per core, at most 8, for a
            synchronous save; a quarter of the cores, at least 1, in the background).
        period: from tf.keras 2.x / R keras: save every `period` epochs (epochs
            `period`, `2 * period`, ... of this callback's life). Not with an integer
            `save_freq`.
        options: from tf.keras 2.x: accepted for compatibility, with a `UserWarning`;
            it has no effect.
        compression: `"zstd"` to write `.safetensors` checkpoints as the zstd container
            (each tensor one zstd frame, compressed in parallel; a `.zst.safetensors` name
            implies it). Other formats have no compressed form.

    Raises:
        ValueError: for a `save_freq`, file name suffix, `period`, `max_to_keep`,
            `threads` or `compression` that cannot work, or a remote `filepath`.
    """

    # Like Keras's ModelCheckpoint (which leaves `async_safe` unset): overriding
    # `on_train_batch_end` makes Keras dispatch batch hooks synchronously, so the snapshot
    # is taken at the step the file name says.
    async_safe = False
    # Set by Keras's MonitorCallback: the best monitored value so far (None before any).
    best: Any

    # The arguments stay unannotated: the signature is Keras's, parameter for parameter
    # (tests/test_callback_parity.py compares them), and Keras annotates none.
    def __init__(  # type: ignore[no-untyped-def]
        self,
        filepath,
        monitor="val_loss",
        verbose=0,
        save_best_only=False,
        save_weights_only=False,
        mode="auto",
        save_freq="epoch",
        initial_value_threshold=None,
        *,
        max_to_keep=None,
        save_on_background=None,
        snapshot_buffers=1,
        threads=None,
        period=None,
        options=None,
        compression=None,
    ):
        super().__init__(monitor, mode, initial_value_threshold)
        self.verbose = verbose
        self.filepath = _keras_private.path_to_string(filepath)
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = _keras_private.INITIAL_LAST_BATCH_SEEN
        self._current_epoch = 0

        # Keras's checks and messages; fastckpt adds `.safetensors` to the suffixes.
        if self.save_freq != "epoch" and not isinstance(self.save_freq, int):
            raise ValueError(
                f"Unrecognized save_freq: {self.save_freq}. "
                "Expected save_freq are 'epoch' or integer values"
            )
        if save_weights_only:
            if not self.filepath.endswith((".weights.h5", ".safetensors", ".shards.json")):
                raise ValueError(
                    "When using `save_weights_only=True` in `ModelCheckpoint`"
                    ", the filepath provided must end in `.weights.h5` "
                    "(Keras weights format). Received: "
                    f"filepath={self.filepath}" + _SAFETENSORS_NOTE
                )
        elif not self.filepath.endswith((".keras", ".h5", ".safetensors")):
            raise ValueError(
                "The filepath provided must end in `.keras` "
                "(Keras model format). Received: "
                f"filepath={self.filepath}" + _SAFETENSORS_NOTE
            )

        formats.check_local(
            self.filepath,
            "filepath",
            hint=" (for remote storage use keras.callbacks.ModelCheckpoint)",
        )
        if period is not None:
            if save_freq != "epoch":
                raise ValueError(
                    "`period` counts epochs and an integer `save_freq` counts batches: pass "
                    f"one of them. Received: period={period}, save_freq={save_freq}"
                )
            period = _positive_int("period", period)
        self.period = 1 if period is None else period
        self.max_to_keep = (
            None if max_to_keep is None else _positive_int("max_to_keep", max_to_keep)
        )
        self.threads = None if threads is None else _positive_int("threads", threads)
        # None: decided once the model is known (`in_background`).
        self.save_on_background = None if save_on_background is None else bool(save_on_background)
        self.snapshot_buffers = _positive_int("snapshot_buffers", snapshot_buffers)
        self.compression = compression
        formats.with_compression(self._format(), compression, self.filepath)
        self.options = options
        if options is not None:
            warnings.warn(
                "`options` has no effect in fastckpt.ModelCheckpoint: it configured "
                "TensorFlow's checkpoint and SavedModel writers, which fastckpt does not "
                f"use. Received: options={options!r}",
                UserWarning,
                stacklevel=2,
            )

        self._epochs_since_last_save = 0
        # How far `_prepare` has asked this `fit`'s first saves to be readied: None,
        # "warm", "buffers", "all"; and the readying itself.
        self._readied: str | None = None
        self._readying = _Readying()
        _readying_thread()
        # Whether the second save of a new file still needs a file reserved (`_prepare`).
        self._second_spare = False
        # Saves handed to the writer and not yet reported, oldest first.
        self._saves: list[_Save] = []
        # Files this callback wrote, oldest first: (main path, every path of that save).
        self._written: list[tuple[str, tuple[str, ...]]] = []
        # For each file this callback rewrites, the files its next saves write into
        # (memory or disk blocks already allocated, and on tmpfs touched): reserved after
        # the first training step, then each the file that a save replaced, kept under a
        # temp name. At most `_SPARES_PER_FILE`; removed when training ends.
        self._spares: dict[str, list[_Spare]] = {}
        self._retention: concurrent.futures.ThreadPoolExecutor | None = None
        self._deletions: list[concurrent.futures.Future[list[tuple[str, OSError]]]] = []

    # Hooks -------------------------------------------------------------------------------

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        # A save left running by an interrupted `fit` ends (or raises) before a new one.
        self._ready()
        self.wait_until_finished()
        _training_state.register(self.model, self)
        self._readied = None
        self._readying = _Readying()
        self._prepare(stepped=False)

    def _prepare(self, stepped: bool = True) -> None:
        """Readies what the first saves need before they are due, on the readying thread
        (`_Readying`), so that the first checkpoint pauses training no longer than a later
        one: when training begins, the save's plan (Keras's traversal) and the snapshot
        buffers, their memory faulted in while the first step runs (TensorFlow traces it,
        JAX compiles it, on one core for a second or more); once a step has run
        (`stepped`), the files the first writes go into. An optimizer not built yet
        (TensorFlow builds it in the first step) is not built here, which would only move
        that step's cost into this hook: memory of the size the buffers are expected to
        need is readied instead (`api.warm_up`), and the save is planned after the first
        step, its buffers made from that memory. A save waits for what is still being
        readied (`_ready`)."""
        if self._readied == "all" or not self.model.built:
            return
        if self._format().name == "process_shards":
            self._readied = "all"  # every process writes its parts at once: nothing to ready
            return
        # The model as this thread sees it: under JAX, `self.model` syncs the trainer's
        # state into the variables, which only the training thread may do.
        model = self.model
        buffers = self.snapshot_buffers if in_background(self.save_on_background, model) else 0
        # Where only this thread may read the variables' values (JAX), what the buffers
        # need of them is read here.
        here = not _readers.values_readable_off_thread()
        optimizer = getattr(model, "optimizer", None)
        if optimizer is not None and not optimizer.built:
            if self._readied is None:
                self._readying.queue(_warm_up, model, buffers, here=here)
                self._readied = "warm"
            return
        if self._readied != "buffers":
            values = _readers.current_values(model) if here else None
            self._readying.queue(_ready_buffers, model, buffers, self, values, self._format())
            self._readied = "buffers"
        if not stepped:
            return
        self._readied = "all"
        # A file name without placeholders is rewritten by every save: room is reserved
        # beside it for the first save to write into, after the buffers (see
        # `_reserve_first`). Later saves reuse the file the one before them replaced.
        path = os.path.abspath(self.filepath)
        if _is_fixed(self.filepath) and not self._spares.get(path):
            self._readying.queue(_reserve_first, model, path)

    def _ready(self) -> None:
        """Waits for what `_prepare` queued and takes over what it made (before a save,
        and when training ends). What failed readied nothing: the save then does that
        work itself, in its hook, and raises there what still fails (readying runs
        beside the training step, where a layer's own saving code may find the values
        taken out of its variables: `_readers.values_readable_off_thread`)."""
        for task in self._readying.take():
            if task.exception() is None and task.result() is not None:
                task.result()(self)

    def _reserve_second(self, after: api.SaveJob | None) -> None:
        """Reserves the file the second save of a new file writes into, once the first
        save's write (`after`, None when it was synchronous and has ended) has ended (see
        `_reserve_first`)."""
        self._second_spare = False
        path = os.path.abspath(self.filepath)
        for spare, job in api.reserve_spares(
            self.model, path, 1, after=[] if after is None else [after]
        ):
            self._keep_spare(path, _Spare(os.fspath(spare), job))

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._prepare()
        self._collect()
        if self._should_save_on_batch(batch):
            self._save_model(epoch=self._current_epoch, batch=batch, logs=logs)

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._current_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._collect()
        if self.monitor_op is None:
            # Delay setup until the model's metrics are all built
            self._set_monitor_op()

        if self.save_freq == "epoch":
            self._epochs_since_last_save += 1
            if self._epochs_since_last_save >= self.period:
                self._epochs_since_last_save = 0
                self._save_model(epoch=epoch, batch=None, logs=logs)

    def on_train_end(self, logs: dict[str, Any] | None = None) -> None:
        error = None
        try:
            self._ready()
            self.wait_until_finished()
        except BaseException as e:
            error = e
        finally:
            self._drop_spares()
        # When `fit` returns, on any process, process 0's checkpoints are durable.
        _processes.settle(f"fastckpt.ModelCheckpoint({self.filepath!r})", error)

    def _drop_spares(self) -> None:
        """Removes the kept files, and lets go of the mappings the writer keeps (on tmpfs)
        of the files this callback wrote: off the training thread, since freeing a large
        file takes time and nothing waits for it (a leftover is a temp file that the next
        save into its folder sweeps once this process is gone)."""
        spares, self._spares = [s for kept in self._spares.values() for s in kept], {}
        written = _identities(p for _, paths in self._written for p in paths)
        _drop_when_done(spares, release=written)

    # State a backup records (fastckpt.BackupAndRestore) ----------------------------------

    def state_key(self) -> str:
        return f"ModelCheckpoint({self.filepath!r}, monitor={self.monitor!r})"

    def get_state(self) -> dict[str, Any]:
        """What decides this callback's next saves: the best value, the counters, and the
        files `max_to_keep` tracks (those still being written included: a backup commits
        after them)."""
        written = [[main, list(paths)] for main, paths in self._written]
        for pending in self._saves:
            main = os.path.abspath(pending.filepath)
            written = [w for w in written if w[0] != main] + [[main, [main]]]
        best = self.best
        return {
            "best": None if best is None else float(best),
            "batches_seen_since_last_saving": self._batches_seen_since_last_saving,
            "last_batch_seen": self._last_batch_seen,
            "current_epoch": self._current_epoch,
            "epochs_since_last_save": self._epochs_since_last_save,
            "written": written,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self.best = state["best"]
        self._batches_seen_since_last_saving = state["batches_seen_since_last_saving"]
        self._last_batch_seen = state["last_batch_seen"]
        self._current_epoch = state["current_epoch"]
        self._epochs_since_last_save = state["epochs_since_last_save"]
        self._written = [(main, tuple(paths)) for main, paths in state["written"]]

    def pending_jobs(self) -> list[api.SaveJob]:
        return [s.handle for s in self._saves if isinstance(s.handle, api.SaveJob) and not s.done()]

    def wait_until_finished(self) -> None:
        """Blocks until every save in flight is durable and `max_to_keep`'s deletions are
        done. The writes run on every core while this waits.

        Raises:
            OSError: the save failed (its own error: `PermissionError`, ...); the file it
                was replacing is left as it was.
            fastckpt.CheckpointError: the save failed for another reason.
        """
        try:
            while self._saves:
                self._collect(wait=True)
        finally:
            self._finish_deletions()

    # Keras's logic -----------------------------------------------------------------------

    def _should_save_on_batch(self, batch: int) -> bool:
        """Handles batch-level saving logic, supports steps_per_execution."""
        if self.save_freq == "epoch":
            return False
        self._batches_seen_since_last_saving, due = batches_due(
            self._last_batch_seen, self._batches_seen_since_last_saving, batch, self.save_freq
        )
        self._last_batch_seen = batch
        return due

    def _decide(
        self, epoch: int, logs: dict[str, Any] | None, filepath: str
    ) -> tuple[bool, str | None]:
        """Keras's `_should_save_model`: whether to save, and the message to print."""
        logs = logs or {}
        if self.save_best_only:
            current = logs.get(self.monitor)
            if current is None:
                warnings.warn(
                    f"Can save best model only with {self.monitor} available.",
                    stacklevel=2,
                )
                return True, None
            is_array = isinstance(current, np.ndarray) or keras.ops.is_tensor(current)
            if is_array and len(current.shape) > 0:
                warnings.warn(
                    "Can save best model only when `monitor` is "
                    f"a scalar value. Received: {current}. "
                    "Falling back to `save_best_only=False`.",
                    stacklevel=2,
                )
                return True, None
            if self.monitor_op is None:
                # Keras sets the direction only at the first epoch end, and so fails on the
                # second batch-level save of epoch 1; resolve it when first needed.
                self._set_monitor_op()
            best_str = "None" if self.best is None else f"{self.best:.5f}"
            current = _processes.agree(current)  # one decision for every process
            if self._is_improvement(current, self.best):
                self.best = current
                return True, (
                    f"\nEpoch {epoch + 1}: {self.monitor} "
                    f"improved from {best_str} to {current:.5f}, "
                    f"saving model to {filepath}"
                )
            return False, f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}"
        return True, f"\nEpoch {epoch + 1}: saving model to {filepath}"

    def _save_model(self, epoch: int, batch: int | None, logs: dict[str, Any] | None) -> None:
        """Decides, prints, and hands the save to the writer."""
        self._ready()
        filepath = self._get_file_path(epoch, batch, logs)
        save, message = self._decide(epoch, logs, filepath)
        background = in_background(self.save_on_background, self.model)
        if save and background:
            self._make_room(filepath, epoch)
        if message is not None and self.verbose > 0:
            print_msg(message)
        if not save:
            return
        queued_behind = self._saves[-1].handle if self._saves else None
        queue_after: list[api.SaveJob | _fastckpt.Job] = []
        if isinstance(queued_behind, api.SaveJob):
            queue_after.append(queued_behind)
        reuse = self._take_spare(filepath)
        if reuse is not None and reuse.reserving is not None and not reuse.reserving.done():
            queue_after.append(reuse.reserving)  # written into once it is filled
        try:
            # Create host directory if it doesn't exist.
            dirname = os.path.dirname(filepath)
            if dirname and _processes.is_writer() and not _keras_private.file_exists(dirname):
                _keras_private.makedirs(dirname)
            job = api.start_save(
                self.model,
                filepath,
                include_optimizer=True,
                overwrite=True,
                background=background,
                threads=self.threads,
                weights_only=self.save_weights_only,
                format=self._format().name,
                compression=self.compression,
                queue_after=queue_after,
                # No training step comes between the last checkpoint of a `fit` and the
                # wait for it in `on_train_end`: its write can read the variables' own
                # buffers, and the copy is saved.
                hold=True if self._is_last_step(epoch, batch) else None,
                reuse=None if reuse is None else reuse.path,
                keep_replaced=True,
            )
            handle = job if background else job.result()
        except BaseException as e:
            if reuse is not None:  # unused, or gone with the failed write
                _remove_spare(reuse)
            if isinstance(e, IsADirectoryError):
                raise _directory_error(filepath) from None
            raise
        if not background:
            self._keep_spare(filepath, _kept(job))
        self._saves.append(_Save(epoch, filepath, handle, reuse))
        written = handle if isinstance(handle, api.SaveJob) else None
        if written is not None:
            _track(written)
        if self._second_spare:
            self._reserve_second(written)
        if written is None:
            self._collect()

    def _make_room(self, filepath: str, epoch: int) -> None:
        """Before a background save: reports the saves that ended, drops a queued save to
        the same file that has not begun, and waits until fewer than `snapshot_buffers`
        saves hold a snapshot."""
        self._collect()
        for queued in list(self._saves):
            handle = queued.handle
            if queued.filepath == filepath and isinstance(handle, api.SaveJob) and handle.cancel():
                self._saves.remove(queued)
                _IN_FLIGHT.discard(handle)
                if queued.reuse is not None:
                    self._keep_spare(filepath, queued.reuse)
                if self.verbose > 0:
                    print_msg(
                        f"\nEpoch {queued.epoch + 1}: the save to {filepath} was dropped "
                        f"before its write began: the save of epoch {epoch + 1} replaces it"
                    )
        while sum(not s.done() for s in self._saves) >= self.snapshot_buffers:
            self._collect(wait=True)
        # A save may have ended after the first look: its line comes before the next save's.
        self._collect()

    def _is_last_step(self, epoch: int, batch: int | None) -> bool:
        """Whether `fit` ends right after this hook, with no training step in between."""
        params = self.params or {}
        if params.get("epochs") is None or epoch != params["epochs"] - 1:
            return False
        if batch is None:
            return True
        steps = params.get("steps")
        return steps is not None and batch >= steps - 1

    def _get_file_path(self, epoch: int, batch: int | None, logs: dict[str, Any] | None) -> str:
        """Returns the file path for checkpoint."""
        logs = logs or {}
        try:
            # `filepath` may contain placeholders such as
            # `{epoch:02d}`,`{batch:02d}` and `{mape:.2f}`. A mismatch between
            # logged metrics and the path's placeholders can cause formatting to
            # fail.
            if batch is None or "batch" in logs:
                file_path: str = self.filepath.format(epoch=epoch + 1, **logs)
            else:
                file_path = self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}'
            ) from e
        return file_path

    def _format(self) -> formats.Format:
        """The file format, from the (unformatted) path and `save_weights_only`."""
        return formats.for_model_checkpoint(self.filepath, self.save_weights_only)

    # Background saves and retention ------------------------------------------------------

    def _collect(self, wait: bool = False) -> None:
        """Reports the saves that ended, oldest first (waiting for the oldest if `wait`):
        prints their lines, records their files for `max_to_keep`, or raises an error."""
        while self._saves:
            pending = self._saves[0]
            handle = pending.handle
            if isinstance(handle, api.SaveJob):
                if not wait and not handle.done():
                    return
                while not handle.wait(_WAIT_SLICE_S):
                    pass
            # Forgotten before anything can raise: an error is reported once.
            self._saves.pop(0)
            wait = False
            if isinstance(handle, api.SaveJob):
                _IN_FLIGHT.discard(handle)
            try:
                if isinstance(handle, api.SaveJob):
                    result = handle.result()
                    self._keep_spare(pending.filepath, _kept(handle))
                else:
                    result = handle
            except IsADirectoryError:
                raise _directory_error(pending.filepath) from None
            except BaseException:
                # A save that failed before its write began leaves its kept file unused.
                if pending.reuse is not None:
                    _remove_spare(pending.reuse)
                # The error ends `fit`, and Keras calls no `on_train_end` then: every kept
                # mapping goes (this callback's spares stay behind, as temp files).
                _fastckpt.release_mappings()
                raise
            written_here = _processes.is_writer()
            if self.verbose > 0 and _keras_private.PRINTS_FINISHED_SAVING and written_here:
                print_msg(
                    f"\nEpoch {pending.epoch + 1}: finished saving model to "
                    f"{pending.filepath} ({_size_text(result.bytes)} in "
                    f"{_seconds_text(result.seconds)})"
                )
            self._record(result)
            self._report_deletions()

    def _take_spare(self, filepath: str) -> _Spare | None:
        """A kept file for a save of `filepath` to write into, if there is one: the readiest
        (one whose reservation has ended, else the one reserved first, which a dropped
        save may have handed back behind a later one)."""
        kept = [s for s in self._spares.get(os.path.abspath(filepath), []) if s.usable()]
        if not kept:
            self._spares.pop(os.path.abspath(filepath), None)
            return None
        spare = min(kept, key=_Spare.readiness)
        kept.remove(spare)
        self._spares[os.path.abspath(filepath)] = kept
        return spare

    def _keep_spare(self, filepath: str, spare: _Spare | None) -> None:
        """Keeps `spare` for a later save of `filepath`; at most `_SPARES_PER_FILE` (an
        extra one, left by saves of the file in flight at once, is removed)."""
        if spare is None:
            return
        kept = self._spares.setdefault(os.path.abspath(filepath), [])
        kept.append(spare)
        if len(kept) > _SPARES_PER_FILE:
            _drop_when_done([kept.pop(0)])

    def _record(self, result: api.SaveResult) -> None:
        # Absolute, so that a change of working folder cannot aim a deletion elsewhere.
        main = os.path.abspath(result.path)
        paths = tuple(os.path.abspath(p) for p in result.paths) or (main,)
        # A file written again under the same name counts once, as the newest.
        self._written = [w for w in self._written if w[0] != main]
        self._written.append((main, paths))
        if self.max_to_keep is None or len(self._written) <= self.max_to_keep:
            return
        dropped = self._written[: -self.max_to_keep]
        self._written = self._written[-self.max_to_keep :]
        kept = {p for _, paths in self._written for p in paths}
        doomed = [p for _, paths in dropped for p in paths if p not in kept]
        if not _processes.is_writer():
            return  # every process tracks the files; the one that wrote them deletes them
        if self._retention is None:
            self._retention = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="fastckpt-retention"
            )
        self._deletions.append(self._retention.submit(_remove_files, doomed))

    def _report_deletions(self, wait: bool = False) -> None:
        still_running = []
        for future in self._deletions:
            if not wait and not future.done():
                still_running.append(future)
                continue
            for path, error in future.result():
                warnings.warn(
                    f"fastckpt.ModelCheckpoint could not delete {path}, an old checkpoint "
                    f"beyond max_to_keep={self.max_to_keep}: {error}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        self._deletions = still_running

    def _finish_deletions(self) -> None:
        if self._retention is not None:
            self._retention.shutdown(wait=True)
            self._retention = None
        self._report_deletions(wait=True)


_SAFETENSORS_NOTE = (
    " (fastckpt.ModelCheckpoint also accepts `.safetensors`, and with "
    "`save_weights_only=True` `.shards.json`)"
)

# Files kept for the saves of one file name: the next save's and the one after it, which
# is what a new file needs (its first save replaces nothing); afterwards each save
# replaces one and leaves one, so one stays kept.
_SPARES_PER_FILE = 2


def _directory_error(filepath: str) -> OSError:
    return OSError(
        "Please specify a non-directory filepath for "
        "ModelCheckpoint. Filepath used is an existing "
        f"directory: {filepath}"
    )


def _positive_int(name: str, value: Any) -> int:
    """`value` as an int >= 1. Integral floats pass: R numbers arrive as floats."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    if ok and not isinstance(value, numbers.Integral):
        ok = float(value).is_integer()
    if not ok or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")
    return int(value)


def batches_due(last_seen: int | None, since: int, batch: int, save_freq: int) -> tuple[int, bool]:
    """Keras's count for an integer `save_freq` (`ModelCheckpoint` and `BackupAndRestore`
    alike, `steps_per_execution` included): the batches seen since the last save once
    `batch` has ended, and whether a save is due (the count then starts again)."""
    if last_seen is None or batch <= last_seen:  # a new epoch
        since += batch + 1  # batches are zero-indexed
    else:
        since += batch - last_seen
    return (0, True) if since >= save_freq else (since, False)


def in_background(asked: bool | None, model: keras.Model) -> bool:
    """Whether a callback's saves of `model` are written in the background, given its
    `save_on_background`: as asked, or when not asked (None) everywhere but under PyTorch
    on the CPU (measured, README "Backends and devices"). There a background writer costs
    training more than the write itself: torch's operations split their work over OpenMP
    threads, one a core, that meet at the end of each operation; a writer thread, however
    low its priority, takes a core from one of them now and then, and the others wait for
    it at every operation of every step."""
    if asked is not None:
        return asked
    if keras.backend.backend() != "torch":
        return True
    values = [getattr(v, "value", v) for v in model.weights[:1]]
    return not all(getattr(getattr(x, "device", None), "type", "cpu") == "cpu" for x in values)


def _kept(job: api.SaveJob) -> _Spare | None:
    """The file a finished save replaced and kept, as a spare: in memory, mapped for the
    next write into it first, on a low-priority thread, if it was never written through a
    kept mapping (a checkpoint there before training began; `_fastckpt.map_kept`), with
    room for a file the size of the one just written."""
    if job.kept is None:
        return None
    try:
        length = os.path.getsize(job.path)
    except OSError:  # (gone already: nothing to size it by)
        length = 0
    return _Spare(job.kept, _fastckpt.map_kept(job.kept, length))


def _remove_spare(spare: _Spare) -> None:
    """Removes a kept file that no save will use: now, or once its reservation ends."""
    if spare.reserving is not None and not spare.reserving.done():
        _drop_when_done([spare])
    else:
        _remove_files([spare.path])


def _identities(paths: Iterable[str]) -> list[tuple[int, int]]:
    """The files `paths` name now, as `(st_dev, st_ino)`: a name may be another file's by
    the time a thread of ours acts on it (the next `fit`'s checkpoint)."""
    out = []
    for path in paths:
        try:
            st = os.stat(path)
        except OSError:
            continue
        out.append((st.st_dev, st.st_ino))
    return out


def _drop_when_done(
    spares: list[_Spare], *, release: Sequence[tuple[int, int]] | None = None
) -> None:
    """Removes kept files on a daemon thread. A reservation that has not begun is dropped
    (it makes no file); one that has is waited for (it fills the file until it ends). When
    training has ended, then lets go of the mappings the writer keeps of the files in
    `release` (`_identities`) and of removed ones (`_fastckpt.release_mappings`): they
    hold the files' memory, even once the files are removed."""
    spares = [s for s in spares if s.reserving is None or not s.reserving.cancel()]
    if not spares and release is None:
        return

    def drop() -> None:
        for spare in spares:
            # Polled, not waited for: a wait would hurry it onto every core.
            while spare.reserving is not None and not spare.reserving.done():
                time.sleep(_WAIT_SLICE_S)
        _remove_files([spare.path for spare in spares])
        if release is not None:
            _fastckpt.release_mappings(list(release))

    threading.Thread(target=drop, name="fastckpt-spares", daemon=True).start()


def _is_fixed(filepath: str) -> bool:
    """Whether `filepath` has no `{...}` fields: every save writes the same file."""
    try:
        return all(field is None for _, field, _, _ in string.Formatter().parse(filepath))
    except ValueError:
        return False


def _remove_files(paths: list[str]) -> list[tuple[str, OSError]]:
    errors = []
    for path in paths:
        try:
            os.remove(path)
        except FileNotFoundError:
            pass  # Already gone: what max_to_keep wants.
        except OSError as e:
            errors.append((path, e))
    return errors


def _size_text(nbytes: int) -> str:
    if nbytes < 1024:
        return f"{nbytes} B"
    size = float(nbytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        size /= 1024
        if size < 1024 or unit == "TiB":
            break
    return f"{size:.2f} {unit}"


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 0.01 else f"{seconds * 1e3:.2f} ms"


def wait_for_saves_in_flight() -> None:
    """Waits (on every core) until every background save of fastckpt's callbacks has
    ended; their errors stay with their callbacks."""
    for handle in list(_IN_FLIGHT):
        while not handle.wait(_WAIT_SLICE_S):
            pass


@atexit.register
def _wait_for_saves_at_exit() -> None:
    for handle in list(_IN_FLIGHT):
        if handle.done():
            continue
        print(
            f"fastckpt: waiting for the checkpoint save to {handle.path} to finish "
            "(Ctrl-C abandons it)",
            file=sys.stderr,
        )
        try:
            while not handle.wait(_WAIT_SLICE_S):
                pass
        except KeyboardInterrupt:
            return
    for handle in list(_IN_FLIGHT):
        error = handle.exception() if handle.done() else None
        if error is not None:
            print(
                f"fastckpt: the checkpoint save to {handle.path} failed: {error}", file=sys.stderr
            )
