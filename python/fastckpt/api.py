"""`save`, `load` and `load_model`: the engine as a plain API."""

from __future__ import annotations

import dataclasses
import errno
import os
import time
import warnings
from typing import Any

import keras
import numpy as np
from keras.src import backend
from keras.src.saving import saving_lib

from fastckpt import _fastckpt, _layouts, _readers, _sharding
from fastckpt._errors import CheckpointContentError
from fastckpt._formats import SUFFIXES, format_for
from fastckpt._restore import assign_all
from fastckpt._snapshot import snapshot, snapshotter_for
from fastckpt._walk import SavePlan, plan_for

FORMAT_VERSION = "1"


@dataclasses.dataclass(frozen=True)
class SaveResult:
    """A durable checkpoint.

    Attributes:
        path: the file written (for sharded weights, the index).
        bytes: bytes written, over all files.
        seconds: from the `save` call to the folder's fsync.
        paths: every file written.
    """

    path: str
    bytes: int
    seconds: float
    paths: tuple[str, ...]


class SaveJob:
    """A save running in the background; `fastckpt.save(..., background=True)` returns one.

    The snapshot is already taken, so the model can keep training. The file appears at its
    path, complete and durable, only when the job has succeeded.
    """

    def __init__(
        self,
        job: _fastckpt.Job | _sharding.ShardedJob,
        path: str,
        started: float,
        handed_off: float | None = None,
    ):
        self._job = job
        self.path = path
        self.kept: str | None = None
        self._started = started
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
        # The file this save replaced, kept for the next save to this path to write into.
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


def _check_path(path: str, overwrite: bool) -> None:
    if "://" in path:
        raise ValueError(f"fastckpt writes local files only. Received: path={path!r}")
    if os.path.isdir(path):
        raise IsADirectoryError(
            errno.EISDIR, "Please specify a non-directory filepath for the checkpoint", path
        )
    if not overwrite and os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "checkpoint exists and overwrite=False", path)


def _keras_metadata(model: keras.Model, weights_only: bool) -> dict[str, str]:
    meta = {
        "format": "fastckpt",
        "fastckpt.format_version": FORMAT_VERSION,
        "keras_version": keras.__version__,
        "keras_backend": backend.backend(),
    }
    if not weights_only:
        meta["keras.config"], _ = saving_lib._serialize_model_as_json(model)
    return meta


def start_write(
    model: keras.Model,
    path: str,
    plan: SavePlan,
    arrays: list[np.ndarray],
    *,
    weights_only: bool,
    threads: int | None,
    background: bool,
    format: str | None = None,
    max_shard_size: float | None = None,
    queue_after: _fastckpt.Job | None = None,
    reuse: str | None = None,
    keep_replaced: bool = False,
) -> _fastckpt.Job | _sharding.ShardedJob:
    """Hands a snapshot to the native writer for `path`'s format (stages 3-6); in the
    background, after `queue_after` has ended if given. `reuse` and `keep_replaced`: see
    `start_save`."""
    fmt = format or format_for(path)
    options = _fastckpt.WriteOptions(
        threads=threads,
        background=background,
        queue_after=queue_after,
        reuse=reuse,
        keep_replaced=keep_replaced,
        direct_io=direct_io_allowed(),
    )
    if fmt == "weights_sharded":
        if max_shard_size is None:
            raise ValueError(
                "Saving sharded weights (a `.weights.json` index) needs `max_shard_size` "
                f"(in GB). Received: path={path!r}"
            )
        return _sharding.start_sharded_write(
            plan, arrays, path, max_shard_size, threads=threads, background=background
        )
    if max_shard_size is not None:
        raise ValueError(
            "`max_shard_size` needs a path ending in `.weights.json` (the shards' index). "
            f"Received: path={path!r}"
        )
    if fmt == "legacy_h5":
        # Keras's own legacy saver lays out the tree (and reads the values itself);
        # fastckpt writes it in parallel, atomically and durably.
        nodes, values = _layouts.legacy_h5(model, plan.include_optimizer)
        return _fastckpt.write_hdf5(path, values, nodes, options=options)
    tensors = [(e.path, a) for e, a in zip(plan.entries, arrays, strict=True)]
    if fmt == "safetensors":
        meta = _keras_metadata(model, weights_only)
        return _fastckpt.write_safetensors(path, tensors, meta, options=options)
    nodes = _layouts.weights_h5_nodes(plan, arrays)
    if fmt == "weights_h5":
        return _fastckpt.write_hdf5(path, tensors, nodes, options=options)
    before, after = _layouts.keras_zip_members(model, plan)
    return _fastckpt.write_keras(path, tensors, nodes, before, after, options=options)


def direct_io_allowed() -> bool:
    """Whether writes may use direct I/O: yes unless `FASTCKPT_DIRECT_IO` is `0`, `false`,
    `off` or `no` (read at every save, so it can be changed at run time)."""
    value = os.environ.get("FASTCKPT_DIRECT_IO", "")
    return value.strip().lower() not in ("0", "false", "off", "no")


def save(
    model: keras.Model,
    path: str | os.PathLike,
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
    model) or `.safetensors`. The file is written beside the target under a temp name,
    fdatasync'd, renamed over the target and the folder fsync'd: a failed save leaves the
    previous file untouched.

    Args:
        model: a built Keras model.
        path: the file to write.
        include_optimizer: also save the optimizer's variables (as Keras does).
        overwrite: if False, an existing file is an error.
        background: return a `SaveJob` as soon as the snapshot is taken. The write then
            runs at the lowest CPU priority (nice 19) and uses every core once waited for.
        threads: writer threads (default: one per core, at most 8; in the background a
            quarter of the cores, at least 1). Large payloads go to disk with direct I/O
            where the filesystem supports it (`FASTCKPT_DIRECT_IO=0` turns that off).
        weights_only: for `.safetensors`, leave the model config out of the metadata.
        max_shard_size: for a `.weights.json` path, split the weights into
            `<stem>_00000.weights.h5`, ... shards of at most this many GB, exactly as
            Keras's `save_weights(..., max_shard_size=...)` does, and write the index.
        format: override the format the suffix implies (`"weights_h5"`, `"keras"`,
            `"legacy_h5"`, `"safetensors"`), e.g. Keras's quirk of writing a legacy full
            model to `x.weights.h5` when `ModelCheckpoint(save_weights_only=False)`.

    Returns:
        A `SaveResult` once the file is durable, or a `SaveJob` if `background`.
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


def start_save(
    model: keras.Model,
    path: str | os.PathLike,
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
    """`save`, returning the job: the callbacks' way in.

    A background write begins once `queue_after` has ended. `hold` (default: for
    synchronous saves) lends the variables' own buffers instead of copying them: only for
    a save that no training step will pass before its write ends. `keep_replaced` keeps
    the file the save replaces under a temp name (`SaveJob.kept` once done), and `reuse`
    writes into such a file instead of a new one: the memory or disk blocks it holds need
    no allocating, which on tmpfs is most of a write's cost."""
    started = time.perf_counter()
    path = os.fspath(path)
    if format is None:
        format_for(path)
    elif format not in SUFFIXES.values():
        raise ValueError(
            f"Unknown format {format!r}; expected one of {sorted(set(SUFFIXES.values()))}"
        )
    _check_path(path, overwrite)
    plan = plan_for(model, include_optimizer)
    snap = snapshot(plan, hold=not background if hold is None else hold, background=background)
    handed_off = time.perf_counter()
    try:
        job = start_write(
            model,
            path,
            plan,
            snap.arrays,
            weights_only=weights_only,
            threads=threads,
            background=background,
            format=format,
            max_shard_size=max_shard_size,
            queue_after=None if queue_after is None else queue_after._job,
            reuse=reuse,
            keep_replaced=keep_replaced,
        )
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
    traversal, on this thread), `buffers` snapshot buffers whose memory is faulted in on an
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
            dtype = np.dtype(_readers.numpy_dtype(backend.standardize_dtype(source.dtype)))
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


def load(model: keras.Model, path: str | os.PathLike, *, threads: int | None = None) -> None:
    """Restores every model and optimizer variable from `path`, bit-exact.

    Reads files written by fastckpt or by Keras itself. Every variable is checked against
    the file first: a missing or unexpected variable, or a shape or dtype mismatch, raises
    `CheckpointContentError` naming the variable's path, before anything is assigned.
    """
    path = os.fspath(path)
    if format_for(path) == "legacy_h5":
        _load_legacy_h5(model, path)
        return
    checkpoint = _readers.open_checkpoint(path)
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
    for name, entry in wanted.items():
        info = checkpoint.tensors[name]
        have = _value_spec(entry.source)
        if have != (info.dtype, tuple(info.shape)):
            raise CheckpointContentError(
                f"{name}: the file holds {_describe(info.dtype, info.shape)}, the model has "
                f"{_describe(*have)}"
                + (
                    f" (variable {entry.source.path})"
                    if isinstance(entry.source, keras.Variable)
                    else ""
                )
            )
    values = checkpoint.read(list(wanted), threads=threads)
    if plan.dynamic:
        _load_through_keras(model, plan, values)
    else:
        assign_all(list(wanted.values()), [values[name] for name in wanted])


def _value_spec(source: Any) -> tuple[str, tuple[int, ...]]:
    if isinstance(source, keras.Variable):
        return backend.standardize_dtype(source.dtype), tuple(source.shape)
    arr = np.asarray(backend.convert_to_numpy(source))
    return arr.dtype.name, arr.shape


def _listing(names: list[str], most: int = 5) -> str:
    shown = ", ".join(names[:most])
    return f"{len(names)} variables: {shown}" + (", ..." if len(names) > most else "")


class _ServingStore(saving_lib.H5IOStore):
    """Serves already-read arrays to Keras's own `_load_state`, for models whose layers
    load their state themselves (custom `load_own_variables`)."""

    def __init__(self, values: dict[str, np.ndarray]) -> None:
        self._values = values
        self._group = "vars"

    def __bool__(self) -> bool:
        return True

    def get(self, path):
        self._group = f"{path}/vars" if path else "vars"
        return self

    def has_path(self, path):
        return any(k.startswith(f"{path}/") for k in self._values)

    def keys(self):
        prefix = f"{self._group}/"
        return [
            k[len(prefix) :]
            for k in self._values
            if k.startswith(prefix) and "/" not in k[len(prefix) :]
        ]

    def __len__(self):
        return len(self.keys())

    def __contains__(self, key):
        return f"{self._group}/{key}" in self._values

    def __getitem__(self, key):
        return self._values[f"{self._group}/{key}"]

    def close(self) -> None:
        pass


def _load_through_keras(model: keras.Model, plan: SavePlan, values: dict[str, np.ndarray]) -> None:
    failed: set[int] = set()
    errors: dict[int, Any] = {}
    saving_lib._load_state(
        model,
        weights_store=_ServingStore(values),
        assets_store=None,
        inner_path="",
        skip_mismatch=False,
        visited_saveables=set(),
        failed_saveables=failed,
        error_msgs=errors,
    )
    if failed:
        saving_lib._raise_loading_failure(errors)


def _load_legacy_h5(model: keras.Model, path: str) -> None:
    """The tf.keras 2.x full-model layout, loaded the way Keras loads it (layer by layer,
    by order), plus the optimizer state when both the file and the model have one."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    # Keras's legacy loader follows soft and external links and trusts every dataset:
    # check the whole file first, as the other readers do.
    _readers.open_checkpoint(path, legacy=True)
    with _readers.content_errors(path), h5py.File(path, "r") as f:
        legacy_h5_format.load_weights_from_hdf5_group(f["model_weights"], model)
        optimizer = getattr(model, "optimizer", None)
        if "optimizer_weights" in f and optimizer is not None:
            if not optimizer.built:
                optimizer.build(model.trainable_variables)
            optimizer.set_weights(legacy_h5_format.load_optimizer_weights_from_hdf5_group(f))


def load_model(
    path: str | os.PathLike,
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
    if format_for(path) == "legacy_h5":
        _readers.open_checkpoint(path, legacy=True)  # links, dtypes and sizes checked first
        return keras.saving.load_model(path, compile=compile, safe_mode=safe_mode)
    checkpoint = _readers.open_checkpoint(path)
    config = checkpoint.model_config
    if config is None:
        raise CheckpointContentError(
            f"{path} holds no model config (it was saved with weights_only=True): build the "
            "model in code and use fastckpt.load(model, path)"
        )
    try:
        model = saving_lib._model_from_config(config, None, compile, safe_mode)
    except ValueError as e:  # a malformed config, or one that safe_mode refuses to run
        raise CheckpointContentError(f"{path}: cannot rebuild the model: {e}") from e
    load(model, path, threads=threads)
    return model
