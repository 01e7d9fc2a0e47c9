"""What every format's reader shares: a checkpoint opened for reading, its tensors, the
parallel read of their payloads, and the one way a damaged file is reported.

Nothing a file says is trusted before it is checked: the native side validates headers and
every (offset, length) against the file's size, and checksums are verified when present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator

import ml_dtypes
import numpy as np

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError, CheckpointError


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a checkpoint dtype name (`bfloat16` is ml_dtypes')."""
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


# The alignment at which TensorFlow (and XLA on CPU) adopt a NumPy array's memory instead
# of copying it: an assign from such an array takes the buffer (NumPy's own large arrays
# come from malloc, 16 bytes past a page boundary, and get copied).
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """`np.empty(shape, dtype)` whose data starts on an `ALIGNMENT`-byte boundary."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + ALIGNMENT, np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's payload is: `offset` -1 when only a format's own reader can read
    it (a chunked or compressed HDF5 dataset). `nbytes` is always the tensor's own size;
    in a zstd container the payload at `offset` is one zstd frame of `stored` bytes, and
    `crc32c` is that of the decoded bytes."""

    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32c: int | None = None
    file: str | None = None  # for sharded checkpoints: the shard holding it
    stored: int | None = None  # a zstd frame's length


# Reads of decoded tensors (zstd frames, h5py's own reads) are made in batches of about
# this many bytes, so that checking a checkpoint never holds all of it in memory.
BATCH_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class Groups:
    """What a conversion carries over besides the tensors: the Keras `vars` groups with
    their attributes (`name`), the `.keras` file's `metadata.json` and assets."""

    groups: list[tuple[str, dict[str, str]]]
    keras_metadata: str | None = None
    assets: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint file opened for reading.

    Attributes:
        tensors: by Keras weight path (`layers/dense/vars/0`), in file order.
        metadata: the file's string metadata.
        model_config: the Keras model config JSON, when the file carries one.
    """

    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    model_config: str | None
    # Reads a tensor the parallel reader cannot (chunked or filtered HDF5 datasets).
    fallback: Callable[[str], np.ndarray] | None = None
    # fastckpt's own tensors beside Keras's tree (`formats.Extra`), by their full path.
    extras: dict[str, TensorInfo] = dataclasses.field(default_factory=dict)

    def read(
        self,
        names: list[str],
        *,
        threads: int | None = None,
        progress: _fastckpt.Progress | None = None,
    ) -> dict[str, np.ndarray]:
        """Reads the named tensors (or extras) in parallel into fresh arrays, checking
        checksums (zstd frames are decoded in parallel, each checked against its own
        checksum and the recorded CRC-32C). `progress` counts the bytes read."""
        out = {}
        plain: dict[str, list[tuple[str, np.ndarray]]] = {}
        frames: dict[str, list[tuple[str, np.ndarray]]] = {}
        for name in names:
            info = self._info(name)
            if info.offset < 0:
                assert self.fallback is not None
                with content_errors(self.path):
                    out[name] = self.fallback(name)
                if progress is not None:
                    progress.add(info.nbytes)
                continue
            arr = aligned_empty(tuple(info.shape), numpy_dtype(info.dtype))
            out[name] = arr
            kind = plain if info.stored is None else frames
            kind.setdefault(info.file or self.path, []).append((name, arr))
        for path, pairs in plain.items():
            items = [(self._info(name).offset, arr) for name, arr in pairs]
            sums = _fastckpt.read_into(path, items, threads=threads, crc32c=True, progress=progress)
            assert sums is not None
            self._check_sums([name for name, _ in pairs], sums)
        for path, pairs in frames.items():
            zitems = [
                (self._info(name).offset, self._info(name).stored or 0, arr) for name, arr in pairs
            ]
            sums = _fastckpt.read_zstd_into(path, zitems, threads=threads, progress=progress)
            self._check_sums([name for name, _ in pairs], sums)
        return out

    def checksums(
        self,
        names: list[str] | None = None,
        *,
        threads: int | None = None,
        progress: _fastckpt.Progress | None = None,
    ) -> dict[str, int]:
        """The CRC-32C of each tensor's bytes, in bounded memory: stored payloads are
        summed in place, zstd frames streamed through the decoder, what only h5py reads a
        batch at a time. Recorded checksums are checked on the way (a mismatch is a
        CheckpointContentError)."""
        names = list(self.tensors) if names is None else names
        out: dict[str, int] = {}
        by_file: dict[str, list[str]] = {}
        frames: dict[str, list[str]] = {}
        decoded: list[str] = []  # read by h5py
        for name in names:
            info = self.tensors[name]
            if info.offset < 0:
                decoded.append(name)
            elif info.stored is not None:
                frames.setdefault(info.file or self.path, []).append(name)
            else:
                by_file.setdefault(info.file or self.path, []).append(name)
        for path, group in by_file.items():
            ranges = [(self.tensors[n].offset, self.tensors[n].nbytes) for n in group]
            sums = _fastckpt.crc32c_of_ranges(path, ranges, threads=threads, progress=progress)
            self._check_sums(group, sums)
            out.update(zip(group, sums, strict=True))
        for path, group in frames.items():
            items = [
                (self.tensors[n].offset, self.tensors[n].stored or 0, self.tensors[n].nbytes)
                for n in group
            ]
            sums = _fastckpt.crc32c_of_frames(path, items, threads=threads, progress=progress)
            self._check_sums(group, sums)
            out.update(zip(group, sums, strict=True))
        for batch in batches(decoded, self.tensors):
            values = self.read(batch, threads=threads, progress=progress)
            out.update((name, _fastckpt.crc32c(arr)) for name, arr in values.items())
            del values  # before the next batch is read
        return out

    def _info(self, name: str) -> TensorInfo:
        return self.tensors.get(name) or self.extras[name]

    def _check_sums(self, direct: list[str], sums: list[int]) -> None:
        for name, got in zip(direct, sums, strict=True):
            want = self._info(name).crc32c
            if want is not None and want != got:
                raise CheckpointContentError(
                    f"{self.path}: checksum mismatch for {name} (file says {want:08x}, data "
                    f"is {got:08x}): the file is corrupt"
                )


def batches(names: list[str], tensors: dict[str, TensorInfo]) -> Iterator[list[str]]:
    """`names` in runs of about `BATCH_BYTES` (a larger tensor alone)."""
    batch: list[str] = []
    size = 0
    for name in names:
        nbytes = tensors[name].nbytes
        if batch and size + nbytes > BATCH_BYTES:
            yield batch
            batch, size = [], 0
        batch.append(name)
        size += nbytes
    if batch:
        yield batch


# What a parsing library raises on a damaged or hostile file. h5py reports a corrupt file as
# an OSError without an errno; a real OS error (no such file, no permission) has one.
_PARSE_ERRORS = (
    OSError,
    KeyError,
    ValueError,
    RuntimeError,
    EOFError,
    NotImplementedError,
    OverflowError,
    struct.error,
    zipfile.BadZipFile,
    zlib.error,
    # h5py's visit callbacks turn a libhdf5 error met during the walk into SystemError
    SystemError,
)


@contextlib.contextmanager
def content_errors(path: str) -> Iterator[None]:
    """Turns what a parser raises about a file's content into CheckpointContentError;
    fastckpt's own errors and real OS errors (with an errno) pass through."""
    try:
        yield
    except CheckpointError:
        raise
    except OSError as e:
        # EINVAL/EOVERFLOW: a seek to an offset the file made up (zipfile, h5py)
        if e.errno is not None and e.errno not in (errno.EINVAL, errno.EOVERFLOW):
            raise
        raise CheckpointContentError(f"{path}: damaged or not a checkpoint: {e}") from e
    except _PARSE_ERRORS as e:
        raise CheckpointContentError(f"{path}: damaged or not a checkpoint: {e!r}") from e
