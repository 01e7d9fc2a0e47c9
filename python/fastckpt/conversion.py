"""`fastckpt convert SRC DST`: a checkpoint copied into another format, streamed, then
verified against its source.

Between the formats in the Keras weights layout (`.weights.h5`, `.weights.json` shards,
`.keras`, `.safetensors`, `.zst.safetensors`) nothing is loaded: the destination is
planned from the source's tensor list, and each payload is read from the source piece by
piece (8 MiB at a time, or one decoded zstd frame per writer thread) as the destination is
written by the native writer, so memory holds a few pieces, not the checkpoint. No Keras
is needed. The groups' attributes (`name`), the model config, a `.keras` file's
`metadata.json` and assets travel along where the destination can hold them.

The legacy full-model `.h5` layout names weights by layer and order, not by the Keras
weights tree, and only a model can map one onto the other: a conversion from or to it
rebuilds the model with Keras from the config the file carries (`fastckpt.load_model`),
holds it in memory, and saves it (`fastckpt.save`). Without Keras, or without a config
(weights-only sources), it is refused with the reason.

Verification, after the write: the destination is opened by its own reader (structure,
every offset, a `.keras` member's CRC-32) and the CRC-32C of every tensor compared with the
source's (whose recorded checksums are checked on the way); names, dtypes and shapes must
be the same. A destination that fails is removed.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from collections import Counter
from typing import Any

from fastckpt import _fastckpt, formats
from fastckpt._environment import direct_io_allowed
from fastckpt._errors import CheckpointContentError
from fastckpt._progress import Reporter


@dataclasses.dataclass(frozen=True)
class ConvertResult:
    """A finished conversion.

    Attributes:
        source: the file converted.
        path: the file written (for sharded weights, the index).
        paths: every file written.
        tensors: tensors copied.
        tensor_bytes: their bytes (decoded).
        bytes: bytes written, over all files.
        seconds: the write and the verification.
        verified: the destination was checked against the source.
    """

    source: str
    path: str
    paths: tuple[str, ...]
    tensors: int
    tensor_bytes: int
    bytes: int
    seconds: float
    verified: bool


def convert(
    source: str | os.PathLike[str],
    destination: str | os.PathLike[str],
    *,
    max_shard_size: float | None = None,
    compression: str | None = None,
    threads: int | None = None,
    verify: bool = True,
    overwrite: bool = True,
    verbose: bool = False,
) -> ConvertResult:
    """Writes the checkpoint at `source` in the format `destination`'s name asks for.

    Args:
        source: a checkpoint in any format fastckpt reads, Keras's own files included.
        destination: the file to write; its suffix picks the format.
        max_shard_size: the largest shard in GB, required for a `.weights.json`
            destination (the command line's default is 5).
        compression: `"zstd"` for the zstd container (implied by `.zst.safetensors`).
        threads: reader and writer threads (default: one per core, at most 8).
        verify: check the written file against the source (see the module's notes).
        overwrite: if False, an existing destination is an error.
        verbose: report bytes and rate on stderr while it runs (a bar on a terminal).

    Returns:
        A `ConvertResult`.

    Raises:
        CopyMismatchError: the destination did not match the source (and was removed).
        CheckpointContentError: the source is damaged (what was written is removed).
        CheckpointNotFoundError: there is no file at `source`.
        ValueError: a conversion that cannot be made (no model config for `.keras`, the
            legacy layout without Keras, ...).
    """
    src, dst = os.fspath(source), os.fspath(destination)
    src_fmt = formats.format_for(src)
    dst_fmt = formats.with_compression(formats.format_for(dst), compression, dst)
    formats.check_target(dst, overwrite)
    if os.path.exists(dst) and os.path.exists(src) and os.path.samefile(src, dst):
        raise ValueError(f"The source and the destination are the same file. Received: {dst!r}")
    started = time.perf_counter()
    if not src_fmt.keras_layout or not dst_fmt.keras_layout:
        return _through_keras(src, dst, dst_fmt, max_shard_size, threads, verify, verbose)
    checkpoint = formats.open_checkpoint(src)
    extras = src_fmt.extras(src)
    names = list(checkpoint.tensors)
    contents = formats.Contents(
        path=dst,
        tensors=_source_tensors(checkpoint),
        dtypes=[checkpoint.tensors[n].dtype for n in names],
        groups=extras.groups,
        model_config=checkpoint.model_config,
        metadata=dict(checkpoint.metadata),
        keras_metadata=extras.keras_metadata,
        assets=extras.assets,
        max_shard_size=max_shard_size,
    )
    files = dst_fmt.plan_contents(contents)
    total = sum(t.nbytes for t in checkpoint.tensors.values())
    with Reporter(f"converting {src} -> {dst}", total, enabled=verbose) as reporter:
        options = _fastckpt.WriteOptions(
            threads=threads, direct_io=direct_io_allowed(), progress=reporter.progress
        )
        report = _fastckpt.write(files, options=options).result()
    paths = tuple(os.fspath(p) for p in report.paths)
    if verify:
        with Reporter(f"verifying {dst}", 2 * total, enabled=verbose) as reporter:
            _verify_copy(checkpoint, dst, paths, threads, reporter.progress)
    return ConvertResult(
        source=src,
        path=dst,
        paths=paths,
        tensors=len(names),
        tensor_bytes=total,
        bytes=report.bytes,
        seconds=time.perf_counter() - started,
        verified=verify,
    )


def _source_tensors(checkpoint: formats.Checkpoint) -> list[tuple[str, Any]]:
    """Each tensor as the writer will read it: a range of the source file, a zstd frame of
    it, or (datasets only h5py can read: chunked, compressed) an array read now."""
    files: dict[str, _fastckpt.SourceFile] = {}
    out: list[tuple[str, Any]] = []
    for name, info in checkpoint.tensors.items():
        if info.offset < 0:
            out.append((name, checkpoint.read([name])[name]))
            continue
        path = info.file or checkpoint.path
        source = files.get(path)
        if source is None:
            source = files[path] = _fastckpt.SourceFile(path)
        out.append(
            (name, source.tensor(info.dtype, list(info.shape), info.offset, stored=info.stored))
        )
    return out


class CopyMismatchError(CheckpointContentError):
    """The file a conversion wrote does not hold its source's tensors (and was removed):
    `fastckpt convert` exits with status 1 for it, 2 for every other failure."""


def _verify_copy(
    checkpoint: formats.Checkpoint,
    dst: str,
    paths: tuple[str, ...],
    threads: int | None,
    progress: _fastckpt.Progress,
) -> None:
    """Checks the written files against the source; removes them if they fail, or if the
    source turns out damaged (its recorded checksums are checked on the way)."""
    try:
        _compare(checkpoint, dst, threads, progress)
    except CheckpointContentError:
        for path in paths:
            _remove(path)
        raise


def _compare(
    checkpoint: formats.Checkpoint, dst: str, threads: int | None, progress: _fastckpt.Progress
) -> None:
    def mismatch(why: str) -> CopyMismatchError:
        return CopyMismatchError(
            f"{dst} does not match its source {checkpoint.path} and was removed: {why}"
        )

    try:
        written = formats.open_checkpoint(dst)
    except CheckpointContentError as e:
        raise mismatch(str(e)) from e
    want = {n: (t.dtype, tuple(t.shape)) for n, t in checkpoint.tensors.items()}
    got = {n: (t.dtype, tuple(t.shape)) for n, t in written.tensors.items()}
    if want != got:
        differ = sorted(set(want.items()) ^ set(got.items()))[:5]
        raise mismatch(f"the tensors differ: {differ}")
    expected = checkpoint.checksums(threads=threads, progress=progress)
    try:
        actual = written.checksums(threads=threads, progress=progress)
    except CheckpointContentError as e:
        raise mismatch(str(e)) from e
    wrong = [n for n in expected if expected[n] != actual[n]]
    if wrong:
        raise mismatch(f"{len(wrong)} tensors differ, e.g. {wrong[0]}")


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _through_keras(
    src: str,
    dst: str,
    dst_fmt: formats.Format,
    max_shard_size: float | None,
    threads: int | None,
    verify: bool,
    verbose: bool,
) -> ConvertResult:
    """A conversion from or to the legacy `.h5` layout: the model rebuilt with Keras."""
    started = time.perf_counter()
    try:
        import keras
    except ImportError as e:
        raise ValueError(
            f"Converting {src} to {dst} maps the legacy `.h5` layout (weights by layer and "
            "order) onto the Keras weights tree, which needs the model: Keras must be "
            f"installed to rebuild it ({e})"
        ) from e
    from fastckpt import api

    formats.open_checkpoint(src, legacy=True)  # missing, damaged or hostile: said here
    try:
        model = _rebuilt(src, threads)
    except CheckpointContentError as e:
        if "holds no model config" in str(e):
            raise ValueError(
                f"Converting to the legacy `.h5` layout needs the model's config, and {src} "
                "holds weights only: rebuild the model in code, fastckpt.load(model, "
                f"{src!r}), then fastckpt.save(model, {dst!r})"
            ) from e
        raise
    with Reporter(f"converting {src} -> {dst}", enabled=verbose) as reporter:
        result = api.start_save(
            model,
            dst,
            threads=threads,
            format=dst_fmt.name,
            max_shard_size=max_shard_size,
            progress=reporter.progress,
        ).result()
    values = [v for v in model.variables]
    if getattr(model, "optimizer", None) is not None:
        values += list(model.optimizer.variables)
    arrays = [_contiguous(keras.ops.convert_to_numpy(v)) for v in values]
    if verify:
        written = formats.open_checkpoint(dst, legacy=True)
        got = Counter(written.checksums(threads=threads).values())
        want = Counter(_fastckpt.crc32c(a) for a in arrays)
        # The legacy layout leaves the optimizer out of files without one: only what
        # the file holds must come from the model.
        if got - want:
            for path in result.paths:
                _remove(path)
            raise CopyMismatchError(
                f"{dst} does not hold the model rebuilt from {src} and was removed"
            )
    return ConvertResult(
        source=src,
        path=dst,
        paths=result.paths,
        tensors=len(arrays),
        tensor_bytes=sum(a.nbytes for a in arrays),
        bytes=result.bytes,
        seconds=time.perf_counter() - started,
        verified=verify,
    )


def _rebuilt(src: str, threads: int | None) -> Any:
    """The model of `src`, compiled as it was saved where Keras's loader can compile it.

    Keras's legacy loader cannot compile some files it writes (keras#19330: a string loss
    such as "mse"); those are rebuilt uncompiled, and their optimizer state stays behind,
    with a warning that says so.
    """
    from fastckpt import api

    if formats.format_for(src).keras_layout:
        return api.load_model(src, threads=threads)
    try:
        return api.load_model(src, threads=threads)
    except (ValueError, TypeError) as e:
        if isinstance(e, CheckpointContentError):
            raise
        model = api.load_model(src, compile=False, threads=threads)  # or not compile's fault
        warnings.warn(
            f"Keras's loader cannot compile {src} ({e}): its model is converted without the "
            "optimizer state",
            UserWarning,
            stacklevel=4,
        )
        return model


def _contiguous(value: Any) -> Any:
    import numpy as np

    return np.ascontiguousarray(value)
