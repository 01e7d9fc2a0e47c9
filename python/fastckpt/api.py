"""`save`, `load` and `load_model`: the engine as a plain API."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal, overload

import keras
import numpy as np

from fastckpt import _fastckpt, _keras_private, _processes, _restore, _snapshot, _walk, formats
from fastckpt._environment import direct_io_allowed
from fastckpt._errors import CheckpointContentError, CheckpointError
from fastckpt._progress import Reporter
from fastckpt._snapshot import WarmBlock, snapshot, snapshotter_for
from fastckpt._walk import Entry, SavePlan, plan_for


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


class _WrittenElsewhere:
    """The job of a save that another process writes (`_processes`), or that was written
    before it was returned (every process's parts of a `.shards.json` save): done, with
    what was written here."""

    kept = None

    def __init__(self, paths: Sequence[str] = (), nbytes: int = 0, seconds: float = 0.0) -> None:
        self.paths = tuple(paths)
        self.bytes = nbytes
        self.seconds = seconds

    def wait(self, timeout: float | None = None) -> bool:
        return True

    def done(self) -> bool:
        return True

    def begun(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False

    def result(self) -> _WrittenElsewhere:
        return self

    def exception(self) -> BaseException | None:
        return None


class SaveJob:
    """A save running in the background; `fastckpt.save(..., background=True)` returns one.

    The snapshot is already taken, so the model can keep training. The files appear at
    their paths, complete and durable, only when the job has succeeded. Waiting for it
    (`wait`, `result`, `exception`) lets its write use every core.
    """

    def __init__(
        self,
        job: _fastckpt.Job | _WrittenElsewhere,
        path: str,
        started: float,
        handed_off: float | None = None,
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
    compression: str | None = ...,
    verbose: bool = ...,
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
    compression: str | None = ...,
    verbose: bool = ...,
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
    compression: str | None = ...,
    verbose: bool = ...,
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
    compression: str | None = None,
    verbose: bool = False,
) -> SaveResult | SaveJob:
    """Saves `model`'s state to `path`, durably and atomically.

    The format follows the suffix: `.weights.h5`, `.keras`, `.h5`/`.hdf5` (legacy full
    model), `.safetensors`, `.zst.safetensors` (the zstd container), `.weights.json`
    (sharded weights) or `.shards.json` (the weights, every process of a multi-process
    training writing the parts it holds; README "Many processes"). Each file is written
    beside its target under a temp name, fdatasync'd, renamed over the target and the
    folder fsync'd: a failed save leaves the previous file untouched.

    Args:
        model: a Keras model. One not built yet can be saved where the file holds the
            model (`.keras`, `.safetensors`, legacy `.h5`: its config, compile state and
            optimizer variables, with Keras's warning), as `model.save` does; the
            weights-only formats refuse it, as `save_weights` does.
        path: the file to write.
        include_optimizer: also save the optimizer's variables (as Keras does).
        overwrite: if False, an existing file is an error.
        background: return a `SaveJob` as soon as the snapshot is taken (`save_async`
            does the same with a precise return type). The write's threads then run at
            the lowest CPU priority (nice 19); once it is waited for, it uses every core
            at the caller's priority.
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
            `"legacy_h5"`, `"safetensors"`, `"weights_sharded"`, `"process_shards"`),
            e.g. Keras's quirk of
            writing a legacy full model to `x.weights.h5` when
            `ModelCheckpoint(save_weights_only=False)`.
        compression: `"zstd"` writes the zstd container: a `.safetensors`-style file in
            which each tensor is one standard zstd frame, compressed in parallel (a
            `.zst.safetensors` name implies it; a `.safetensors` name is written as the
            container too). Other formats have no compressed form.
        verbose: report the bytes written and the rate while a synchronous save writes,
            on stderr (a bar on a terminal); quiet by default.

    Returns:
        A `SaveResult` once the files are durable, or a `SaveJob` if `background` (a
        `.shards.json` save is written before it returns, whatever `background` says:
        every process takes part in it at once).

    Raises:
        ValueError: a path, format or compression that cannot be written, or a model not
            built yet for a weights-only format.
    """
    with contextlib.ExitStack() as stack:
        progress = None
        if verbose and not background:
            reporter = stack.enter_context(Reporter(f"saving {os.fspath(path)}"))
            reporter.total = plan_bytes(plan_for(model, include_optimizer))
            progress = reporter.progress
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
            compression=compression,
            progress=progress,
        )
        if background:
            return job
        if _processes.count() == 1:
            return job.result()
        # Every process returns once process 0's files are durable, or raises if not.
        error = None
        try:
            result = job.result()
        except BaseException as e:
            error = e
        _processes.settle(f"fastckpt.save({job.path!r})", error)
        return result


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
    compression: str | None = None,
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
        compression=compression,
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
    queue_after: Sequence[SaveJob | _fastckpt.Job] = (),
    hold: bool | None = None,
    reuse: str | None = None,
    keep_replaced: bool = False,
    extra: formats.Extra | None = None,
    companions: Sequence[tuple[str, bytes]] = (),
    previous_suffix: str | None = None,
    compression: str | None = None,
    progress: _fastckpt.Progress | None = None,
) -> SaveJob:
    """`save`, returning the job (finished unless in the background): the callbacks' way in.

    A background write begins once every job in `queue_after` has ended. `extra` adds
    fastckpt's own attributes and tensors to a `.weights.h5` file (a backup's training
    state); `companions` are small files `(path, bytes)` committed with the checkpoint, the
    last of them last (a backup's `training_metadata.json`); `previous_suffix` keeps each
    file's previous version under that suffix (`.bkp`). `hold` (default: for
    synchronous saves) lends the variables' own buffers instead of copying them: only for
    a save that no training step will pass before its write ends. `keep_replaced` keeps
    the file the save replaces under a temp name (`SaveJob.kept` once done), and `reuse`
    writes into such a file instead of a new one: the memory or disk blocks it holds need
    no allocating, which on tmpfs is most of a write's cost.
    """
    started = time.perf_counter()
    fmt = formats.format_for(path) if format is None else formats.by_name(format)
    writer = _processes.is_writer()
    # Process 0 writes the checkpoint for every process (see `_processes`); the others
    # still plan it, since Keras's traversal makes collective calls on every process.
    path = formats.check_target(path, overwrite) if writer else os.fspath(path)
    fmt = formats.with_compression(fmt, compression, path)
    plan = plan_for(model, include_optimizer)
    if not model.built:
        # Keras's rule: a model without weights yet is saved with its config (and compile
        # state and optimizer variables), but its weights alone cannot be.
        if not fmt.holds_model:
            raise ValueError(f"{_keras_private.UNBUILT_WEIGHTS_ERROR} Received: path={path!r}")
        warnings.warn(_keras_private.UNBUILT_SAVE_WARNING, UserWarning, stacklevel=3)
    if fmt.name == "process_shards":
        if extra is not None or companions or max_shard_size is not None:
            raise ValueError(f"a `.shards.json` save holds the weights alone: {path!r}")
        return _save_parts(model, path, plan, weights_only, threads, progress, started)
    _processes.check_whole_on_writer(plan.entries)
    if not background:
        # A synchronous write runs at once: what it must follow ends first (its errors
        # stay with its owner).
        for earlier in queue_after:
            earlier.wait()
        queue_after = ()
    hold = not background if hold is None else hold
    # Where the layout of the last such file is known, a background save into a kept file
    # in memory takes its snapshot straight into that file (`Snapshotter.into`).
    target = (fmt.name, path, include_optimizer, weights_only, max_shard_size, extra is None)
    into = None
    if writer and background and reuse and not hold:
        into = snapshotter_for(plan).into(target, reuse)
    if writer:
        snap = snapshot(plan, hold=hold, background=background, into=into)
    else:
        # Only planned here, and released before any step: the backend's own buffers serve,
        # with no copy and no arena.
        snap = snapshot(plan, hold=True)
    handed_off = time.perf_counter()
    try:
        request = formats.SaveRequest(
            model,
            path,
            plan,
            snap.arrays,
            weights_only=weights_only,
            max_shard_size=max_shard_size,
            extra=extra,
        )
        options = _fastckpt.WriteOptions(
            threads=threads,
            background=background,
            # (On process 0 every job is a write of its own.)
            queue_after=[j for j in map(_native_job, queue_after) if j is not None],
            reuse=reuse,
            keep_replaced=keep_replaced,
            direct_io=direct_io_allowed(),
            previous_suffix=previous_suffix,
            progress=progress,
        )
        files = fmt.plan(request)
        if writer and len(files) == 1 and not hold:
            moved = snapshotter_for(plan).placed(target, snap.arrays, files[0].slots())
            if into is not None and moved:
                # The layout moved since the places were learnt (longer metadata): the
                # values go to the writer as copies, to be written to their new places.
                arrays = [np.array(a) if i in into else a for i, a in enumerate(snap.arrays)]
                request = dataclasses.replace(request, arrays=arrays)
                files = fmt.plan(request)
        files += [_fastckpt.plan_bytes(p, data) for p, data in companions]
        if not writer:
            snap.release()
            return SaveJob(_WrittenElsewhere(), path, started)
        job = _fastckpt.write(files, options=options)
    except BaseException:
        snap.release()
        raise
    snap.lend_to(job)
    return SaveJob(job, path, started, handed_off)


def _save_parts(
    model: keras.Model,
    path: str,
    plan: SavePlan,
    weights_only: bool,
    threads: int | None,
    progress: _fastckpt.Progress | None,
    started: float,
) -> SaveJob:
    """A `.shards.json` save (see `formats/process_shards.py`), by every process together,
    on the calling thread: each process writes the parts of the values it is to write into
    its own file (durably, beside the index); once every process's file is, process 0
    writes the index, whose rename commits the set, and removes the files of the set it
    replaced. A process that fails fails the save on every process, and the previous set
    stays whole."""
    from fastckpt.formats import process_shards as shards
    from fastckpt.formats.safetensors import metadata

    count, me = _processes.count(), _processes.index()
    token = _processes.token()
    # One process holds every value: the snapshot's readers serve (nothing trains before
    # the write ends, so they lend the variables' buffers).
    whole = snapshot(plan, hold=True).arrays if count == 1 else None
    values: list[tuple[str, str, tuple[int, ...], list[shards.Block]]] = []
    mine: list[tuple[str, np.ndarray]] = []
    for i, entry in enumerate(plan.entries):
        value = getattr(entry.source, "value", entry.source)
        if whole is not None:
            shape = tuple(whole[i].shape)
            blocks = [shards.Block((0,) * len(shape), shape, 0)]
            dtype = whole[i].dtype.name
        else:
            shape = tuple(int(n) for n in value.shape)
            blocks = _processes.blocks(value)
            dtype = formats.numpy_dtype(_restore.held_dtype(entry.source)).name
        for block in blocks:
            if block.writer == me:
                data = whole[i] if whole is not None else _processes.block_data(value, block)
                mine.append((block.name(entry.path), data))
        values.append((entry.path, dtype, shape, blocks))
    part = shards.part_path(path, token, me, count)
    parts = [shards.part_path(path, token, p, count) for p in range(count)]
    meta = {shards.PART_OF: os.path.basename(path)}
    options = _fastckpt.WriteOptions(
        threads=threads, direct_io=direct_io_allowed(), progress=progress
    )
    error: BaseException | None = None
    written = 0
    try:
        report = _fastckpt.write(
            [_fastckpt.plan_safetensors(part, mine, meta)], options=options
        ).result()
        written = report.bytes
    except BaseException as e:
        error = e
    failed = [p for p, ok in enumerate(_processes.outcomes(error is None)) if not ok]
    if failed:
        with contextlib.suppress(FileNotFoundError):
            if error is None:
                os.remove(part)  # no index will name it
        if error is not None:
            raise error
        raise CheckpointError(
            f"fastckpt.save({path!r}): process(es) {failed} could not write their parts "
            "(their errors are in their own output); the previous set, if any, is intact"
        )
    error = None
    if me == 0:
        try:
            document = shards.index_document(
                token, count, values, plan.groups, metadata(model, weights_only), path
            )
            _fastckpt.write([_fastckpt.plan_bytes(path, document)]).result()
            written += len(document)
            for stray in shards.stray_parts(path, parts):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(stray)
        except BaseException as e:
            error = e
            for orphan in parts:  # the set this save wrote, which no index names
                with contextlib.suppress(FileNotFoundError):
                    os.remove(orphan)
    _processes.settle(f"fastckpt.save({path!r})", error)
    seconds = time.perf_counter() - started
    return SaveJob(_WrittenElsewhere([path, *parts], written, seconds), path, started)


def _native_job(job: SaveJob | _fastckpt.Job) -> _fastckpt.Job | None:
    """The native job behind `job` (None for a save another process writes)."""
    native = job._job if isinstance(job, SaveJob) else job
    return native if isinstance(native, _fastckpt.Job) else None


def prepare(
    model: keras.Model,
    *,
    include_optimizer: bool = True,
    buffers: int = 1,
    owner: object = None,
    warm: Sequence[WarmBlock] = (),
    values: Mapping[int, Any] | None = None,
    format: formats.Format | None = None,
) -> list[Any]:
    """Readies the snapshot buffers of saves of `model` before the first one is due: the
    plan (Keras's traversal) and `buffers` buffers whose memory is faulted
    in on a low-priority thread, made from `warm` (`warm_up`'s memory) where it is large
    enough; returns them (their `prefault` jobs tell when they are ready). The buffers of
    several `owner`s (the callbacks of one `fit`) add up. The save's payload size is
    measured too (`plan_bytes`, for `reserve_spares`), and with `format` what its first
    save would find out (`Format.ready`). Off the training thread, what all this needs of
    the variables' values comes from `values` (`_readers.current_values`, read on the
    training thread)."""
    plan = plan_for(model, include_optimizer)
    if not _processes.is_writer():
        return []  # process 0 writes: nothing to ready here
    plan_bytes(plan, values)
    if format is not None:
        format.ready(model, plan)
    return snapshotter_for(plan, values).prepare(buffers, owner, warm)


def warm_up(
    model: keras.Model, *, include_optimizer: bool = True, buffers: int = 1
) -> list[WarmBlock]:
    """`prepare` for a model whose optimizer is not built yet (TensorFlow builds it in the
    first training step): memory of the size the buffers are expected to need once it is
    (`_walk.sizes_once_built`), faulted in while that step runs, for `prepare(warm=...)`
    to make the buffers from once the plan exists. Nothing is built. Empty when no
    estimate can be made."""
    sizes = _walk.sizes_once_built(model, include_optimizer)
    if sizes is None or not buffers or not _processes.is_writer():
        return []
    reader = snapshotter_for(plan_for(model, include_optimizer)).reader
    if reader is None:
        return []
    least = reader.arena_min_bytes()
    size = _snapshot.arena_bytes([n for n in sizes if n >= least])
    return [_snapshot.warm_block(size, reader) for _ in range(buffers)]


def reserve_spares(
    model: keras.Model,
    path: str,
    count: int,
    *,
    include_optimizer: bool = True,
    after: Sequence[SaveJob | _fastckpt.Job] = (),
) -> list[tuple[pathlib.Path, _fastckpt.Job]]:
    """`count` files beside `path` (if its folder exists) with room for a save of `model`,
    each reserved on a low-priority thread, for the first saves to write into instead of
    new files (`start_save(reuse=file, queue_after=[job])`): their memory (tmpfs) or
    blocks allocated ahead. They are reserved one after the other once every job in
    `after` has ended (the snapshot buffers' faulting in, a write): on scarce spare CPU,
    what the saves need first is ready first."""
    if not _processes.is_writer() or not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return []
    length = plan_bytes(plan_for(model, include_optimizer))
    reserved: list[tuple[pathlib.Path, _fastckpt.Job]] = []
    jobs = [j for j in map(_native_job, after) if j is not None]
    for _ in range(count):
        reserved.append(_fastckpt.reserve_spare(path, length, after=jobs))
        jobs = [reserved[-1][1]]
    return reserved


def plan_bytes(plan: SavePlan, values: Mapping[int, Any] | None = None) -> int:
    """The payload bytes a save of `plan` writes (its metadata comes on top), kept on the
    plan; `values` as for `prepare`."""
    if plan.payload_bytes is not None:
        return plan.payload_bytes
    total = 0
    for entry in plan.entries:
        source = entry.source
        if isinstance(source, keras.Variable):
            # What a save writes is what the variable holds (float32 for a float64 one
            # under JAX with x64 off), as Keras's files do.
            dtype = formats.numpy_dtype(_restore.held_dtype(source, values))
            total += int(np.prod(source.shape, dtype=np.int64)) * dtype.itemsize
    plan.payload_bytes = total
    return total


def _build_optimizer_if_needed(model: keras.Model, names: set[str]) -> None:
    optimizer = getattr(model, "optimizer", None)
    # A model not built yet keeps its optimizer unbuilt, as Keras's loading does: built now,
    # on no variables, it would have no slots for the weights the model builds later.
    if optimizer is None or optimizer.built or not model.built:
        return
    if any(n.startswith("optimizer/") for n in names):
        optimizer.build(model.trainable_variables)


def _describe(dtype: str, shape: tuple[int, ...]) -> str:
    return f"{dtype} {tuple(shape)}"


def load(
    model: keras.Model,
    path: str | os.PathLike[str],
    *,
    threads: int | None = None,
    verbose: bool = False,
) -> None:
    """Restores every model and optimizer variable from `path`, bit-exact.

    Reads files written by fastckpt or by Keras itself. Every variable is checked against
    the file first: a missing or unexpected variable, or a shape or dtype mismatch, raises
    `CheckpointContentError` naming the variable's path, before anything is assigned.
    A layer the file holds under another path by which the model also reaches it (a
    property aliasing a tracked layer) is found there, as Keras's own loading finds it.

    Args:
        model: the model to restore.
        path: the checkpoint, in any format `fastckpt.save` writes.
        threads: reader threads (default: one per core, at most 8).
        verbose: report the bytes read and the rate on stderr; quiet by default.

    Raises:
        CheckpointContentError: the file does not match the model, or is damaged.
        CheckpointNotFoundError: there is no file at `path` (a FileNotFoundError and a
            ValueError).
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
    wanted = _match(model, plan, checkpoint, path)
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
            what = "shape" if tuple(info.shape) != shape else "dtype"
            raise CheckpointContentError(
                f"{name}: the file holds {_describe(info.dtype, info.shape)}, the model has "
                f"{_describe(declared, shape)}"
                + (f" (held as {held})" if held != declared else "")
                + (f" at {entry.path}" if entry.path != name else "")
                + (f" (variable {entry.source.path})" if variable else "")
                # Keras's words, which its users and their tools search for.
                + f": the {what} of the target variable and the {what} of the target value"
                " in `variable.assign(value)` must match"
            )
        if how is not None and info.dtype != held:
            ways[name] = (formats.numpy_dtype(held), how)
    total = sum(checkpoint.tensors[name].nbytes for name in wanted)
    with Reporter(f"loading {path}", total, enabled=verbose) as reporter:
        values = checkpoint.read(list(wanted), threads=threads, progress=reporter.progress)
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


def _match(
    model: keras.Model, plan: SavePlan, checkpoint: formats.Checkpoint, path: str
) -> dict[str, Entry]:
    """Which of the file's tensors each plan entry loads from, by the file's name: the
    entry's own path, or where Keras's loading would find it (`_alias_targets`)."""
    by_path = {e.path: e for e in plan.entries}
    missing = [p for p in by_path if p not in checkpoint.tensors]
    unexpected = [p for p in checkpoint.tensors if p not in by_path]
    if not missing and not unexpected:
        return by_path
    if not plan.dynamic:
        found = _alias_targets(model, plan, checkpoint)
        if found is not None:
            return found
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


def _alias_targets(
    model: keras.Model, plan: SavePlan, checkpoint: formats.Checkpoint
) -> dict[str, Entry] | None:
    """The file's tensor for each entry as Keras's own loading assigns them (a dry run that
    tries an object at every path the model reaches it by), when that loads every entry
    from a tensor of its own and uses every tensor; None otherwise."""
    shapes = {name: tuple(t.shape) for name, t in checkpoint.tensors.items()}
    try:
        claimed = _keras_private.keras_load_targets(model, shapes)
    except Exception:  # Keras's loading fails too (or a layer's own loading needs values)
        return None
    out: dict[str, Entry] = {}
    for entry in plan.entries:
        name = claimed.get(id(entry.source))
        if name is None or name in out:
            return None
        out[name] = entry
    return out if set(out) == set(checkpoint.tensors) else None


def _value_spec(source: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(source, keras.Variable):
        return keras.backend.standardize_dtype(source.dtype), tuple(source.shape)
    arr = np.asarray(keras.ops.convert_to_numpy(source))
    return arr.dtype.name, arr.shape


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return f"{len(names)} variables: {shown}" + (", ..." if len(names) > most else "")


def latest(folder_or_pattern: str | os.PathLike[str], *, verify: bool = True) -> str | None:
    """The newest complete checkpoint: among the checkpoint files in a folder (or matching
    a glob pattern), the one whose recorded training step is the highest.

    The step is the one recorded inside the file (the optimizer's iteration count,
    `optimizer/vars/0`, which Keras's and fastckpt's files of a compiled model hold), never
    the file's time. Skipped: fastckpt's temp files, the shards of a sharded checkpoint
    (its index stands for it), legacy `.h5` files, files without a step, and with `verify`
    files that fail `fastckpt.verify` (structure and every checksum, so every payload is
    read: pass `verify=False` to only open each file).

    Returns:
        The path, or None when no file qualifies.
    """
    import glob

    from fastckpt.verify import verify as verify_file

    target = os.fspath(folder_or_pattern)
    if os.path.isdir(target):
        names = [os.path.join(target, n) for n in sorted(os.listdir(target))]
    else:
        names = sorted(glob.glob(target))
    candidates = []
    for path in names:
        name = os.path.basename(path)
        if _fastckpt.is_temp_name(name) or not os.path.isfile(path):
            continue
        try:
            fmt = formats.format_for(path)
        except ValueError:
            continue
        if fmt.keras_layout:
            candidates.append(path)
    shards = set()
    for path in candidates:
        if formats.format_for(path).sharded:
            with contextlib.suppress(OSError, ValueError, CheckpointContentError):
                checkpoint = formats.open_checkpoint(path)
                shards |= {t.file for t in checkpoint.tensors.values() if t.file}
    best: tuple[int, int, str] | None = None
    for path in candidates:
        if path in shards:
            continue
        try:
            step = _recorded_step(path)
        except (OSError, ValueError):  # unreadable or damaged: not a candidate
            continue
        if step is None or (verify and not verify_file(path).ok):
            continue
        key = (step, os.stat(path).st_mtime_ns, path)
        if best is None or key > best:
            best = key
    return None if best is None else best[2]


def _recorded_step(path: str) -> int | None:
    """The training step a checkpoint records: its optimizer's iteration count."""
    checkpoint = formats.open_checkpoint(path)
    info = checkpoint.tensors.get("optimizer/vars/0")
    if info is None or info.shape != () or not info.dtype.startswith(("int", "uint")):
        return None
    return int(checkpoint.read(["optimizer/vars/0"])["optimizer/vars/0"])


def load_model(
    path: str | os.PathLike[str],
    custom_objects: dict[str, Any] | None = None,
    compile: bool = True,
    safe_mode: bool = True,
    *,
    threads: int | None = None,
    verbose: bool = False,
) -> keras.Model:
    """Rebuilds a model from a checkpoint that carries its config, then loads its state.

    Works for `.keras` files and `.safetensors` / `.zst.safetensors` files saved with the
    config (the default of `fastckpt.save`); legacy `.h5` files are handed to
    `keras.saving.load_model`. The arguments are `keras.saving.load_model`'s.

    Args:
        path: the checkpoint.
        custom_objects: names of custom classes or functions the config refers to, as
            Keras's `custom_objects` (or wrap the call in `keras.saving.custom_object_scope`).
        compile: compile the model as it was saved (if it was).
        safe_mode: refuse configs that would run code (`lambda` layers), as Keras does.
        threads: reader threads (default: one per core, at most 8).
        verbose: report the bytes read and the rate on stderr; quiet by default.

    Returns:
        The model, with every variable restored. A model saved before it was built comes
        back unbuilt (with its compile state), as Keras's `load_model` gives it.

    Raises:
        CheckpointNotFoundError: there is no file at `path`: a `FileNotFoundError`, and the
            `ValueError` that `keras.saving.load_model` raises for a missing file.
        CheckpointContentError: the file is damaged, or its config cannot be rebuilt.
    """
    path = os.fspath(path)
    if not formats.format_for(path).keras_layout:
        formats.open_checkpoint(path, legacy=True)  # links, dtypes and sizes checked first
        return keras.saving.load_model(
            path, custom_objects=custom_objects, compile=compile, safe_mode=safe_mode
        )
    checkpoint = formats.open_checkpoint(path)
    config = checkpoint.model_config
    if config is None:
        raise CheckpointContentError(
            f"{path} holds no model config (it was saved with weights_only=True): build the "
            "model in code and use fastckpt.load(model, path)"
        )
    try:
        model = _keras_private.model_from_config(config, compile, safe_mode, custom_objects)
    except (ValueError, TypeError) as e:  # a malformed config, or one safe_mode refuses
        raise CheckpointContentError(f"{path}: cannot rebuild the model: {e}") from e
    load(model, path, threads=threads, verbose=verbose)
    return model
