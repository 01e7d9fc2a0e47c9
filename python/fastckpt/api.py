"""`save`, `load` and `load_model`: the engine as a plain API."""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, Literal, overload

import keras
import numpy as np

from fastckpt import _fastckpt, _keras_private, _restore, formats
from fastckpt._errors import CheckpointContentError
from fastckpt._snapshot import snapshot, snapshotter_for
from fastckpt._walk import SavePlan, plan_for


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """A durable checkpoint.

    Attributes:
        path: the file written (for sharded weights, the index).
        bytes: bytes written, over all files.
        seconds: the snapshot and the write (not the time a write waited behind another).
        paths: every file written.
    """

    path: str
    bytes: int
    seconds: float
    paths: tuple[str, ...]


class SaveJob:
    """A save running in the background; `fastckpt.save(..., background=True)` returns one.

    The snapshot is already taken, so the model can keep training. The files appear at
    their paths, complete and durable, only when the job has succeeded. Waiting for it
    (`wait`, `result`, `exception`) lets its write use every core.
    """

    def __init__(
        self, job: _fastckpt.Job, path: str, started: float, handed_off: float | None = None
    ) -> None:
        self._job = job
        self.path = path
        # The file this save replaced, kept for the next save of the path to write into
        # (`start_save(keep_replaced=True)`), once the save is done.
        self.kept: str | None = None
        # Walk + snapshot time; the writer reports its own duration, so a result collected
        # late does not count the time nobody was waiting.
        self._before_write = (started if handed_off is None else handed_off) - started

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until the save ends or `timeout` seconds pass; returns whether it ended."""
        return self._job.wait(timeout)

    def done(self) -> bool:
        """Whether the save has ended: successfully, with an error, or cancelled."""
        return self._job.done()

    def begun(self) -> bool:
        """Whether the write has begun (a save queued behind another has not)."""
        return self._job.begun()

    def cancel(self) -> bool:
        """Drops the save if its write has not begun; returns whether it was dropped. A
        dropped save never touches its file; `result()` then raises
        `concurrent.futures.CancelledError`."""
        return self._job.cancel()

    def result(self, timeout: float | None = None) -> SaveResult:
        """Waits for the save and returns its `SaveResult`, or raises its error.

        Raises:
            TimeoutError: `timeout` passed first.
        """
        if not self._job.wait(timeout):
            raise TimeoutError(f"the save to {self.path} is still running after {timeout} s")
        report = self._job.result()
        self.kept = None if report.kept is None else os.fspath(report.kept)
        paths = tuple(os.fspath(p) for p in report.paths)
        seconds = self._before_write + report.seconds
        return SaveResult(path=self.path, bytes=report.bytes, seconds=seconds, paths=paths)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """Waits for the save and returns its error, or None when it succeeded."""
        if not self._job.wait(timeout):
            raise TimeoutError(f"the save to {self.path} is still running after {timeout} s")
        return self._job.exception()

    def __repr__(self) -> str:
        state = "done" if self.done() else "running"
        return f"<fastckpt.SaveJob {state} path={self.path!r}>"


def direct_io_allowed() -> bool:
    """Whether writes may use direct I/O: yes unless `FASTCKPT_DIRECT_IO` is `0`, `false`,
    `off` or `no` (read at every save, so it can be changed at run time)."""
    value = os.environ.get("FASTCKPT_DIRECT_IO", "")
    return value.strip().lower() not in ("0", "false", "off", "no")


@overload
def save(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = ...,
    overwrite: bool = ...,
    background: Literal[False] = ...,
    threads: int | None = ...,
    weights_only: bool = ...,
    format: str | None = ...,
    max_shard_size: float | None = ...,
) -> SaveResult: ...
@overload
def save(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = ...,
    overwrite: bool = ...,
    background: Literal[True],
    threads: int | None = ...,
    weights_only: bool = ...,
    format: str | None = ...,
    max_shard_size: float | None = ...,
) -> SaveJob: ...
@overload
def save(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = ...,
    overwrite: bool = ...,
    background: bool,
    threads: int | None = ...,
    weights_only: bool = ...,
    format: str | None = ...,
    max_shard_size: float | None = ...,
) -> SaveResult | SaveJob: ...
def save(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = True,
    overwrite: bool = True,
    background: bool = False,
    threads: int | None = None,
    weights_only: bool = False,
    format: str | None = None,
    max_shard_size: float | None = None,
) -> SaveResult | SaveJob:
    """Saves `model`'s state to `path`, durably and atomically.

    The format follows the suffix: `.weights.h5`, `.keras`, `.h5`/`.hdf5` (legacy full
    model), `.safetensors`, or `.weights.json` (sharded weights). Each file is written
    beside its target under a temp name, fdatasync'd, renamed over the target and the
    folder fsync'd: a failed save leaves the previous file untouched.

    Args:
        model: a built Keras model.
        path: the file to write.
        include_optimizer: also save the optimizer's variables (as Keras does).
        overwrite: if False, an existing file is an error.
        background: return a `SaveJob` as soon as the snapshot is taken (`save_async`
            does the same with a precise return type). The write then runs at the lowest
            CPU priority (nice 19) and uses every core once waited for.
        threads: writer threads (default: one per core, at most 8; in the background a
            quarter of the cores, at least 1, until waited for). Large payloads go to disk
            with direct I/O where the filesystem supports it (`FASTCKPT_DIRECT_IO=0` turns
            that off).
        weights_only: for `.safetensors`, leave the model config out of the metadata.
        max_shard_size: for a `.weights.json` path, split the weights into
            `<stem>_00000.weights.h5`, ... shards of at most this many GB, exactly as
            Keras's `save_weights(..., max_shard_size=...)` does, and write the index;
            the shards and the index commit together, the index last.
        format: override the format the suffix implies (`"weights_h5"`, `"keras"`,
            `"legacy_h5"`, `"safetensors"`, `"weights_sharded"`), e.g. Keras's quirk of
            writing a legacy full model to `x.weights.h5` when
            `ModelCheckpoint(save_weights_only=False)`.

    Returns:
        A `SaveResult` once the files are durable, or a `SaveJob` if `background`.
    """
    job = start_save(
        model,
        path,
        include_optimizer=include_optimizer,
        overwrite=overwrite,
        background=background,
        threads=threads,
        weights_only=weights_only,
        format=format,
        max_shard_size=max_shard_size,
    )
    return job if background else job.result()


def save_async(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = True,
    overwrite: bool = True,
    threads: int | None = None,
    weights_only: bool = False,
    format: str | None = None,
    max_shard_size: float | None = None,
) -> SaveJob:
    """`save(..., background=True)`: returns the `SaveJob` once the snapshot is taken."""
    return start_save(
        model,
        path,
        include_optimizer=include_optimizer,
        overwrite=overwrite,
        background=True,
        threads=threads,
        weights_only=weights_only,
        format=format,
        max_shard_size=max_shard_size,
    )


def start_save(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    include_optimizer: bool = True,
    overwrite: bool = True,
    background: bool = False,
    threads: int | None = None,
    weights_only: bool = False,
    format: str | None = None,
    max_shard_size: float | None = None,
    queue_after: SaveJob | None = None,
    hold: bool | None = None,
    reuse: str | None = None,
    keep_replaced: bool = False,
) -> SaveJob:
    """`save`, returning the job (finished unless in the background): the callbacks' way in.

    A background write begins once `queue_after` has ended. `hold` (default: for
    synchronous saves) lends the variables' own buffers instead of copying them: only for
    a save that no training step will pass before its write ends. `keep_replaced` keeps
    the file the save replaces under a temp name (`SaveJob.kept` once done), and `reuse`
    writes into such a file instead of a new one: the memory or disk blocks it holds need
    no allocating, which on tmpfs is most of a write's cost.
    """
    started = time.perf_counter()
    fmt = formats.format_for(path) if format is None else formats.by_name(format)
    path = formats.check_target(path, overwrite)
    plan = plan_for(model, include_optimizer)
    snap = snapshot(plan, hold=not background if hold is None else hold, background=background)
    handed_off = time.perf_counter()
    try:
        request = formats.SaveRequest(
            model, path, plan, snap.arrays, weights_only=weights_only, max_shard_size=max_shard_size
        )
        options = _fastckpt.WriteOptions(
            threads=threads,
            background=background,
            queue_after=None if queue_after is None else queue_after._job,
            reuse=reuse,
            keep_replaced=keep_replaced,
            direct_io=direct_io_allowed(),
        )
        job = _fastckpt.write(fmt.plan(request), options=options)
    except BaseException:
        snap.release()
        raise
    snap.lend_to(job)
    return SaveJob(job, path, started, handed_off)


@dataclasses.dataclass
class Prepared:
    """What `prepare` readied: the snapshot buffers, and the job reserving a spare file."""

    buffers: list[Any]
    spare: _fastckpt.Job | None


def prepare(
    model: keras.Model,
    *,
    include_optimizer: bool = True,
    buffers: int = 1,
    spare_for: str | None = None,
) -> Prepared:
    """Readies what saves of `model` need before the first one is due: the plan (Keras's
    traversal, on this thread), `buffers` snapshot buffers whose memory is faulted in on a
    low-priority thread, and with `spare_for` a file beside that path with room for the
    checkpoint, reserved on the same kind of thread, for the first save to write into
    (`start_save(reuse=...)`, once the job has succeeded)."""
    plan = plan_for(model, include_optimizer)
    arenas = snapshotter_for(plan).prepare(buffers)
    spare = None
    folder = os.path.dirname(os.path.abspath(spare_for)) if spare_for else None
    if spare_for is not None and folder is not None and os.path.isdir(folder):
        spare = _fastckpt.reserve_spare(spare_for, plan_bytes(plan))
    return Prepared(arenas, spare)


def plan_bytes(plan: SavePlan) -> int:
    """The payload bytes a save of `plan` writes (its metadata comes on top)."""
    total = 0
    for entry in plan.entries:
        source = entry.source
        if isinstance(source, keras.Variable):
            # What a save writes is what the variable holds (float32 for a float64 one
            # under JAX with x64 off), as Keras's files do.
            dtype = formats.numpy_dtype(_restore.held_dtype(source))
            total += int(np.prod(source.shape, dtype=np.int64)) * dtype.itemsize
    return total


def _build_optimizer_if_needed(model: keras.Model, names: set[str]) -> None:
    optimizer = getattr(model, "optimizer", None)
    if optimizer is None or optimizer.built:
        return
    if any(n.startswith("optimizer/") for n in names):
        optimizer.build(model.trainable_variables)


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} {tuple(shape)}"


def load(model: keras.Model, path: str | os.PathLike[str], *, threads: int | None = None) -> None:
    """Restores every model and optimizer variable from `path`, bit-exact.

    Reads files written by fastckpt or by Keras itself. Every variable is checked against
    the file first: a missing or unexpected variable, or a shape or dtype mismatch, raises
    `CheckpointContentError` naming the variable's path, before anything is assigned.
    """
    path = os.fspath(path)
    fmt = formats.format_for(path)
    if not fmt.keras_layout:
        fmt.impl.load(model, path)
        return
    checkpoint = formats.open_checkpoint(path)
    names = set(checkpoint.tensors)
    _build_optimizer_if_needed(model, names)
    plan = plan_for(model, include_optimizer=True)
    in_file = sorted(n for n in names if n.startswith("optimizer/"))
    in_model = sorted(e.path for e in plan.entries if e.path.startswith("optimizer/"))
    if in_file != in_model:
        if in_file and in_model:
            # What Keras's own loading does when the optimizers differ (a different class,
            # or Keras 3.15's compile_config losing a string optimizer): keep the model's
            # optimizer state and say so.
            warnings.warn(
                f"Skipping the optimizer state in {path}: the model's optimizer has "
                f"{len(in_model)} variables, the file's has {len(in_file)}",
                stacklevel=2,
            )
        plan = plan_for(model, include_optimizer=False)
        checkpoint.tensors = {
            n: t for n, t in checkpoint.tensors.items() if not n.startswith("optimizer/")
        }
    wanted = {e.path: e for e in plan.entries}
    missing = [p for p in wanted if p not in checkpoint.tensors]
    unexpected = [p for p in checkpoint.tensors if p not in wanted]
    if missing or unexpected:
        raise CheckpointContentError(
            f"{path} does not match the model: "
            + "; ".join(
                part
                for part in (
                    missing and f"missing {_listing(missing)}",
                    unexpected and f"not in the model {_listing(unexpected)}",
                )
                if part
            )
        )
    # How each variable takes the file's dtype ("cast" or "fits", see `_restore.accepts`),
    # decided for all of them before anything is read.
    ways: dict[str, tuple[np.dtype, str]] = {}
    for name, entry in wanted.items():
        info = checkpoint.tensors[name]
        declared, shape = _value_spec(entry.source)
        variable = isinstance(entry.source, keras.Variable)
        held = _restore.held_dtype(entry.source) if variable else declared
        how = _restore.accepts(info.dtype, declared, held) if variable else None
        if tuple(info.shape) != shape or (how is None and info.dtype != declared):
            raise CheckpointContentError(
                f"{name}: the file holds {_describe(info.dtype, info.shape)}, the model has "
                f"{_describe(declared, shape)}"
                + (f" (held as {held})" if held != declared else "")
                + (f" (variable {entry.source.path})" if variable else "")
            )
        if how is not None and info.dtype != held:
            ways[name] = (formats.numpy_dtype(held), how)
    values = checkpoint.read(list(wanted), threads=threads)
    for name, (held_as, how) in ways.items():
        value = _restore.converted(values[name], held_as, how)
        if value is None:
            raise CheckpointContentError(
                f"{name}: the file holds {checkpoint.tensors[name].dtype} values that "
                f"{held_as.name} cannot hold"
            )
        values[name] = value
    if plan.dynamic:
        _keras_private.load_state(model, values)
    else:
        _restore.assign_all(list(wanted.values()), [values[name] for name in wanted])


def _value_spec(source: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(source, keras.Variable):
        return keras.backend.standardize_dtype(source.dtype), tuple(source.shape)
    arr = np.asarray(keras.ops.convert_to_numpy(source))
    return arr.dtype.name, arr.shape


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return f"{len(names)} variables: {shown}" + (", ..." if len(names) > most else "")


def load_model(
    path: str | os.PathLike[str],
    *,
    compile: bool = True,
    safe_mode: bool = True,
    threads: int | None = None,
) -> keras.Model:
    """Rebuilds a model from a checkpoint that carries its config, then loads its state.

    Works for `.keras` files and `.safetensors` files saved with the config (the default
    of `fastckpt.save`); legacy `.h5` files are handed to `keras.saving.load_model`.
    """
    path = os.fspath(path)
    if not formats.format_for(path).keras_layout:
        formats.open_checkpoint(path, legacy=True)  # links, dtypes and sizes checked first
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    checkpoint = formats.open_checkpoint(path)
    config = checkpoint.model_config
    if config is None:
        raise CheckpointContentError(
            f"{path} holds no model config (it was saved with weights_only=True): build the "
            "model in code and use fastckpt.load(model, path)"
        )
    try:
        model = _keras_private.model_from_config(config, compile, safe_mode)
    except (ValueError, TypeError) as e:  # a malformed config, or one safe_mode refuses
        raise CheckpointContentError(f"{path}: cannot rebuild the model: {e}") from e
    load(model, path, threads=threads)
    return model
