"""`ModelCheckpoint`: `keras.callbacks.ModelCheckpoint` (Keras 3.15) that saves in the background.

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
import sys
import warnings
from typing import Any

import numpy as np
from keras.src import backend
from keras.src.callbacks.monitor_callback import MonitorCallback
from keras.src.utils import file_utils, io_utils

from fastckpt import api

# How long one wait for a background save may block before Python gets to run signal
# handlers again: a Ctrl-C must always be able to interrupt a wait.
_WAIT_SLICE_S = 0.25

# Saves handed to the writer and not yet collected, over all callbacks: waited for at
# interpreter exit, so that a checkpoint started just before an exception ends the program
# still lands (a second Ctrl-C abandons it; the target then keeps its previous content).
_IN_FLIGHT: set[api.SaveJob] = set()


@dataclasses.dataclass
class _Save:
    """A save this callback started: what to report when it is done."""

    epoch: int
    filepath: str
    handle: api.SaveJob | api.SaveResult


class ModelCheckpoint(MonitorCallback):
    """Saves the Keras model or its weights at some frequency, in the background.

    A drop-in for `keras.callbacks.ModelCheckpoint` (Keras 3.15): the same arguments,
    file names, decisions, messages and warnings, and files that stock Keras loads. On each
    save the training thread only copies the variables to host memory; fastckpt writes the
    file in the background to a temp file beside the target, fsyncs it and renames it into
    place, so a checkpoint on disk is always complete.

    - At most one save is in flight per callback: a save waits for the previous one first,
      so memory stays bounded to one snapshot.
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
            With `save_weights_only=True` it must end in `.weights.h5` or
            `.safetensors`; otherwise in `.keras`, `.h5` or `.safetensors`. As in Keras,
            `x.weights.h5` with `save_weights_only=False` holds a legacy full-model h5.
            A `.safetensors` file holds the weights (and optimizer state) under their
            `.weights.h5` names, plus the model config unless `save_weights_only=True`.
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
        save_on_background: `False` saves on the training thread, like Keras.
        threads: writer threads per save (default: one per core, at most 8, for a
            synchronous save; a quarter of the cores, at least 1, in the background).
        period: from tf.keras 2.x / R keras: save every `period` epochs (epochs
            `period`, `2 * period`, ... of this callback's life). Not with an integer
            `save_freq`.
        options: from tf.keras 2.x: accepted for compatibility, with a `UserWarning`;
            it has no effect.

    Raises:
        ValueError: for a `save_freq`, file name suffix, `period`, `max_to_keep` or
            `threads` that cannot work, or a remote `filepath`.
    """

    # Like Keras's ModelCheckpoint (which leaves `async_safe` unset): overriding
    # `on_train_batch_end` makes Keras dispatch batch hooks synchronously, so the snapshot
    # is taken at the step the file name says.
    async_safe = False

    def __init__(
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
        save_on_background=True,
        threads=None,
        period=None,
        options=None,
    ):
        super().__init__(monitor, mode, initial_value_threshold)
        self.verbose = verbose
        self.filepath = file_utils.path_to_string(filepath)
        self.save_best_only = save_best_only
        self.save_weights_only = save_weights_only
        self.save_freq = save_freq
        self._batches_seen_since_last_saving = 0
        self._last_batch_seen = None
        self._current_epoch = 0

        # Keras's checks and messages; fastckpt adds `.safetensors` to the suffixes.
        if self.save_freq != "epoch" and not isinstance(self.save_freq, int):
            raise ValueError(
                f"Unrecognized save_freq: {self.save_freq}. "
                "Expected save_freq are 'epoch' or integer values"
            )
        if save_weights_only:
            if not self.filepath.endswith((".weights.h5", ".safetensors")):
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

        if "://" in self.filepath:
            raise ValueError(
                "fastckpt.ModelCheckpoint writes local files only; for remote storage use "
                f"keras.callbacks.ModelCheckpoint. Received: filepath={self.filepath}"
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
        self.save_on_background = bool(save_on_background)
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
        self._pending: _Save | None = None
        # Files this callback wrote, oldest first: (main path, every path of that save).
        self._written: list[tuple[str, tuple[str, ...]]] = []
        self._retention: concurrent.futures.ThreadPoolExecutor | None = None
        self._deletions: list[concurrent.futures.Future] = []

    # Hooks -------------------------------------------------------------------------------

    def on_train_begin(self, logs=None):
        # A save left running by an interrupted `fit` ends (or raises) before a new one.
        self.wait_until_finished()

    def on_train_batch_end(self, batch, logs=None):
        if self._pending is not None and self._pending_done():
            self._collect()
        if self._should_save_on_batch(batch):
            self._save_model(epoch=self._current_epoch, batch=batch, logs=logs)

    def on_epoch_begin(self, epoch, logs=None):
        self._current_epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if self._pending is not None and self._pending_done():
            self._collect()
        if self.monitor_op is None:
            # Delay setup until the model's metrics are all built
            self._set_monitor_op()

        if self.save_freq == "epoch":
            self._epochs_since_last_save += 1
            if self._epochs_since_last_save >= self.period:
                self._epochs_since_last_save = 0
                self._save_model(epoch=epoch, batch=None, logs=logs)

    def on_train_end(self, logs=None):
        self.wait_until_finished()

    def wait_until_finished(self) -> None:
        """Blocks until the save in flight is durable and `max_to_keep`'s deletions are done.

        Raises:
            OSError: the save failed (its own error: `PermissionError`, ...); the file it
                was replacing is left as it was.
            fastckpt.CheckpointError: the save failed for another reason.
        """
        try:
            self._collect(wait=True)
        finally:
            self._finish_deletions()

    # Keras's logic -----------------------------------------------------------------------

    def _should_save_on_batch(self, batch):
        """Handles batch-level saving logic, supports steps_per_execution."""
        if self.save_freq == "epoch":
            return False
        if self._last_batch_seen is None or batch <= self._last_batch_seen:
            # New epoch.
            add_batches = batch + 1  # batches are zero-indexed.
        else:
            add_batches = batch - self._last_batch_seen
        self._batches_seen_since_last_saving += add_batches
        self._last_batch_seen = batch

        if self._batches_seen_since_last_saving >= self.save_freq:
            self._batches_seen_since_last_saving = 0
            return True
        return False

    def _decide(self, epoch, logs, filepath) -> tuple[bool, str | None]:
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
            is_array = isinstance(current, np.ndarray) or backend.is_tensor(current)
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
            if self._is_improvement(current, self.best):
                self.best = current
                return True, (
                    f"\nEpoch {epoch + 1}: {self.monitor} "
                    f"improved from {best_str} to {current:.5f}, "
                    f"saving model to {filepath}"
                )
            return False, f"\nEpoch {epoch + 1}: {self.monitor} did not improve from {best_str}"
        return True, f"\nEpoch {epoch + 1}: saving model to {filepath}"

    def _save_model(self, epoch, batch, logs):
        """Decides, prints, and hands the save to the writer."""
        filepath = self._get_file_path(epoch, batch, logs)
        save, message = self._decide(epoch, logs, filepath)
        if save:
            # One save in flight: the previous one ends first, and its line is printed
            # (or its error raised) before this one's.
            self._collect(wait=True)
        if message is not None and self.verbose > 0:
            io_utils.print_msg(message)
        if not save:
            return
        try:
            # Create host directory if it doesn't exist.
            dirname = os.path.dirname(filepath)
            if dirname and not file_utils.exists(dirname):
                file_utils.makedirs(dirname)
            handle = api.save(
                self.model,
                filepath,
                include_optimizer=True,
                overwrite=True,
                background=self.save_on_background,
                threads=self.threads,
                weights_only=self.save_weights_only,
                format=self._format(),
            )
        except IsADirectoryError:
            raise _directory_error(filepath) from None
        self._pending = _Save(epoch, filepath, handle)
        if isinstance(handle, api.SaveJob):
            _IN_FLIGHT.add(handle)
        else:
            self._collect()

    def _get_file_path(self, epoch, batch, logs):
        """Returns the file path for checkpoint."""
        logs = logs or {}
        try:
            # `filepath` may contain placeholders such as
            # `{epoch:02d}`,`{batch:02d}` and `{mape:.2f}`. A mismatch between
            # logged metrics and the path's placeholders can cause formatting to
            # fail.
            if batch is None or "batch" in logs:
                file_path = self.filepath.format(epoch=epoch + 1, **logs)
            else:
                file_path = self.filepath.format(epoch=epoch + 1, batch=batch + 1, **logs)
        except KeyError as e:
            raise KeyError(
                f'Failed to format this callback filepath: "{self.filepath}". Reason: {e}'
            ) from e
        return file_path

    def _format(self) -> str:
        """The file format, from the (unformatted) path and `save_weights_only`."""
        if self.filepath.endswith(".safetensors"):
            return "safetensors"
        if self.save_weights_only:
            return "weights_h5"
        if self.filepath.endswith(".keras"):
            return "keras"
        # `model.save` writes the legacy format for any `.h5` name, `x.weights.h5` included.
        return "legacy_h5"

    # Background saves and retention ------------------------------------------------------

    def _pending_done(self) -> bool:
        handle = self._pending.handle
        return not isinstance(handle, api.SaveJob) or handle.done()

    def _collect(self, wait: bool = False) -> None:
        """Reports the pending save if it ended (waiting for it if `wait`): prints its line,
        records its files for `max_to_keep`, or raises its error."""
        pending = self._pending
        if pending is None:
            return
        handle = pending.handle
        if isinstance(handle, api.SaveJob):
            if not wait and not handle.done():
                return
            while not handle.wait(_WAIT_SLICE_S):
                pass
        # Forgotten before anything can raise: an error is reported once.
        self._pending = None
        _IN_FLIGHT.discard(handle)
        try:
            result = handle.result() if isinstance(handle, api.SaveJob) else handle
        except IsADirectoryError:
            raise _directory_error(pending.filepath) from None
        if self.verbose > 0:
            io_utils.print_msg(
                f"\nEpoch {pending.epoch + 1}: finished saving model to {pending.filepath} "
                f"({_size_text(result.bytes)} in {_seconds_text(result.seconds)})"
            )
        self._record(result)
        self._report_deletions()

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


_SAFETENSORS_NOTE = " (fastckpt.ModelCheckpoint also accepts `.safetensors`)"


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
