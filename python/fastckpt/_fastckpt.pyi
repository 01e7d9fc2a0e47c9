"""The native module: the whole boundary between Python and the Rust core.

Planning (`plan_*`) turns arrays and a format's tree into a `PlannedFile`, laid out to the
byte; `write` writes one file, or several that commit together, as one `Job`. Errors are
the builtin `OSError` subclasses (with errno and path) or `fastckpt.CheckpointError`s.
"""

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from typing_extensions import disjoint_base, final

__all__ = [
    "DEFAULT_BACKGROUND_THREADS",
    "DEFAULT_THREADS",
    "DTYPES",
    "ZSTD_DEFAULT_LEVEL",
    "Attr",
    "HeaderTensor",
    "Job",
    "Node",
    "PinnedHost",
    "PlannedFile",
    "Progress",
    "SourceFile",
    "SourceTensor",
    "WriteOptions",
    "WriteReport",
    "copy_from_dlpack",
    "copy_into",
    "crc32_of_range",
    "crc32c",
    "crc32c_of_frames",
    "crc32c_of_ranges",
    "cuda_available",
    "is_temp_name",
    "pin_host",
    "plan_bytes",
    "plan_hdf5",
    "plan_keras",
    "plan_safetensors",
    "plan_zstd",
    "prefault",
    "read_into",
    "read_zstd_into",
    "reserve_spare",
    "safetensors_header",
    "sweep_stale_temps",
    "write",
    "zstd_header",
]

#: Writer threads of a write that somebody waits for: one per core, at most 8.
DEFAULT_THREADS: int
#: Writer threads of a background write until waited for: a quarter of the cores.
DEFAULT_BACKGROUND_THREADS: int
#: The dtypes a checkpoint can hold, by numpy name, with their sizes in bytes.
DTYPES: dict[str, int]
#: The zstd level `plan_zstd` compresses at unless told.
ZSTD_DEFAULT_LEVEL: int

_Path = str | os.PathLike[str]
_Tensors = Sequence[tuple[str, np.ndarray | SourceTensor]]

@final
class Progress:
    """A count of bytes done, read while a write or a read runs (for progress reports)."""

    def __new__(cls) -> Progress: ...
    @property
    def bytes(self) -> int:
        """Bytes done so far."""
    def add(self, n: int) -> None:
        """Counts `n` more bytes done (work done in Python)."""

@final
class SourceFile:
    """A checkpoint file that tensors are copied from, opened once for all of them."""

    def __new__(cls, path: _Path) -> SourceFile: ...
    @property
    def path(self) -> Path: ...
    def tensor(
        self, dtype: str, shape: Sequence[int], offset: int, *, stored: int | None = None
    ) -> SourceTensor:
        """The tensor stored at `offset`: as it is, or with `stored` as one zstd frame of
        that many bytes."""

@final
class SourceTensor:
    """A tensor of a source file, read piece by piece as the file it is planned into is
    written; plan functions take it wherever they take an array."""

    @property
    def dtype(self) -> str:
        """The numpy name of its dtype."""
    @property
    def shape(self) -> list[int]: ...
    @property
    def nbytes(self) -> int: ...

@final
class WriteReport:
    """What a finished write produced."""

    @property
    def paths(self) -> list[Path]:
        """Every file written, the main one first."""
    @property
    def bytes(self) -> int:
        """Bytes written, over all files."""
    @property
    def seconds(self) -> float:
        """From the moment the write began (not counting time queued behind another)."""
    @property
    def kept(self) -> Path | None:
        """The file the write replaced, kept under a temp name for the next write."""

@final
class Job:
    """A write: finished when returned for a synchronous write, running otherwise."""

    def wait(self, timeout: float | None = None) -> bool:
        """Waits at most `timeout` seconds; returns whether it ended. Unless `timeout` is
        0, the write takes every core from now on."""
    def done(self) -> bool:
        """Whether it ended: successfully, with an error, or cancelled."""
    def begun(self) -> bool:
        """Whether the write has begun (one queued behind another has not)."""
    def cancel(self) -> bool:
        """Drops the write if it has not begun; returns whether it was dropped."""
    def hurry(self) -> None:
        """Lets the write use every core from now on, without waiting for it."""
    def result(self) -> WriteReport:
        """Waits, then returns the report or raises the write's error."""
    def exception(self) -> BaseException | None:
        """Waits, then returns the write's error, or None."""

@final
class WriteOptions:
    """How and when a write runs."""

    def __new__(
        cls,
        *,
        threads: int | None = None,
        background: bool = False,
        queue_after: Sequence[Job] = ...,
        reuse: _Path | None = None,
        keep_replaced: bool = False,
        direct_io: bool = True,
        previous_suffix: str | None = None,
        progress: Progress | None = None,
    ) -> WriteOptions: ...
    @property
    def threads(self) -> int | None:
        """Writer threads (default: `DEFAULT_THREADS`, or in the background
        `DEFAULT_BACKGROUND_THREADS` until waited for)."""
    @property
    def background(self) -> bool:
        """Write on a low-priority thread and return at once."""
    @property
    def queue_after(self) -> list[Job]:
        """Begin only once these jobs have ended (background writes)."""
    @property
    def reuse(self) -> Path | None:
        """A kept file of this process to write into instead of a new temp file."""
    @property
    def keep_replaced(self) -> bool:
        """Keep the file this write replaces, for the next write (`WriteReport.kept`)."""
    @property
    def direct_io(self) -> bool:
        """Write large payloads with `O_DIRECT` where the filesystem supports it."""
    @property
    def previous_suffix(self) -> str | None:
        """Keep the version each file replaces as `<path><suffix>`, swapped in with it."""
    @property
    def progress(self) -> Progress | None:
        """Counts the payload bytes written."""

@final
class PlannedFile:
    """A file planned to the byte, waiting for `write`; it owns the arrays it writes."""

    @property
    def path(self) -> Path:
        """Where it will be written."""
    @property
    def length(self) -> int:
        """Its length in bytes (for a compressed container, the most it can take)."""
    def slots(self) -> list[tuple[int, int, int]]:
        """Where each payload held in memory goes: `(offset in the file, address of its
        bytes, length)`, in file order; empty for a compressed container (laid out as it is
        written) and once handed to `write()`."""

@disjoint_base
class Attr:
    """An HDF5 attribute, in the form h5py gives the Python value Keras assigns."""

    @final
    class Utf8(Attr):
        """A `str`: a scalar variable-length UTF-8 string."""

        __match_args__: ClassVar[tuple[str, ...]]
        def __new__(cls, name: str, value: str) -> Attr.Utf8: ...
        @property
        def name(self) -> str: ...
        @property
        def value(self) -> str: ...

    @final
    class Bytes(Attr):
        """A `bytes`: a scalar variable-length ASCII-charset string."""

        __match_args__: ClassVar[tuple[str, ...]]
        def __new__(cls, name: str, value: bytes) -> Attr.Bytes: ...
        @property
        def name(self) -> str: ...
        @property
        def value(self) -> bytes: ...

    @final
    class StrArray(Attr):
        """A list of `bytes`: 1-D variable-length ASCII-charset strings (given decoded)."""

        __match_args__: ClassVar[tuple[str, ...]]
        def __new__(cls, name: str, values: Sequence[str]) -> Attr.StrArray: ...
        @property
        def name(self) -> str: ...
        @property
        def values(self) -> list[str]: ...

    @final
    class FixedBytesArray(Attr):
        """A numpy `S<width>` array: 1-D fixed-length NUL-padded strings."""

        __match_args__: ClassVar[tuple[str, ...]]
        def __new__(cls, name: str, width: int, items: Sequence[bytes]) -> Attr.FixedBytesArray: ...
        @property
        def name(self) -> str: ...
        @property
        def width(self) -> int: ...
        @property
        def items(self) -> list[bytes]: ...

    @final
    class EmptyList(Attr):
        """An empty list: a 1-D float64 array of length 0."""

        __match_args__: ClassVar[tuple[str, ...]]
        def __new__(cls, name: str) -> Attr.EmptyList: ...
        @property
        def name(self) -> str: ...

@final
class Node:
    """A group (`tensor=None`) or a dataset (`tensor`: its index in the tensors)."""

    def __new__(cls, path: str, tensor: int | None = None, attrs: Sequence[Attr] = ...) -> Node: ...
    @property
    def path(self) -> str:
        """Absolute, like `"/layers/dense/vars/0"`; `"/"` is the root group."""
    @property
    def tensor(self) -> int | None: ...
    @property
    def attrs(self) -> list[Attr]: ...

@final
class HeaderTensor:
    """One tensor as a SafeTensors header describes it, checked against the file."""

    @property
    def name(self) -> str: ...
    @property
    def dtype(self) -> str:
        """The numpy name of the dtype."""
    @property
    def shape(self) -> list[int]: ...
    @property
    def offset(self) -> int:
        """The payload's absolute offset in the file."""
    @property
    def nbytes(self) -> int: ...
    @property
    def crc32c(self) -> int | None:
        """The CRC-32C fastckpt recorded, if the file has one (in a zstd container, of
        the decoded bytes)."""
    @property
    def stored(self) -> int | None:
        """In a zstd container: the length of its frame at `offset`."""

def plan_safetensors(path: _Path, tensors: _Tensors, metadata: dict[str, str]) -> PlannedFile:
    """Plans a SafeTensors file (fastckpt adds a CRC-32C per tensor to the metadata)."""

def plan_zstd(
    path: _Path, tensors: _Tensors, metadata: dict[str, str], *, level: int = ...
) -> PlannedFile:
    """Plans a zstd container: each tensor one zstd frame, compressed in parallel as the
    file is written."""

def plan_hdf5(path: _Path, tensors: _Tensors, nodes: Sequence[Node]) -> PlannedFile:
    """Plans an HDF5 file from a tree of groups and datasets."""

def plan_keras(
    path: _Path,
    tensors: _Tensors,
    nodes: Sequence[Node],
    before: Sequence[tuple[str, bytes]],
    after: Sequence[tuple[str, bytes]],
    *,
    weights_name: str = "model.weights.h5",
) -> PlannedFile:
    """Plans a `.keras` zip: `before`, the HDF5 tree as `weights_name`, then `after`."""

def plan_bytes(path: _Path, data: bytes) -> PlannedFile:
    """Plans a file holding `data`."""

def write(files: Sequence[PlannedFile], *, options: WriteOptions | None = None) -> Job:
    """Writes one file, or several that commit together (the last one last), durably and
    atomically; returns the job (finished unless in the background)."""

def read_into(
    path: _Path,
    items: Sequence[tuple[int, np.ndarray]],
    *,
    threads: int | None = None,
    crc32c: bool = False,
    progress: Progress | None = None,
) -> list[int] | None:
    """Reads `(offset, array)` items in parallel; their CRC-32C values with `crc32c`."""

def read_zstd_into(
    path: _Path,
    items: Sequence[tuple[int, int, np.ndarray]],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """Decodes `(offset, stored, array)` zstd frames in parallel into the arrays; returns
    the CRC-32C of each."""

def crc32c(array: np.ndarray) -> int:
    """The CRC-32C of an array's bytes."""

def crc32c_of_frames(
    path: _Path,
    frames: Sequence[tuple[int, int, int]],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """The CRC-32C of what each `(offset, stored, length)` zstd frame decodes to, each
    frame streamed through the decoder and checked (bounded memory)."""

def crc32c_of_ranges(
    path: _Path,
    ranges: Sequence[tuple[int, int]],
    *,
    threads: int | None = None,
    progress: Progress | None = None,
) -> list[int]:
    """The CRC-32C of each `(offset, length)` range, read in parallel in bounded memory."""

def crc32_of_range(path: _Path, offset: int, length: int, *, threads: int | None = None) -> int:
    """The CRC-32 (zip's) of `length` bytes at `offset`, read in parallel."""

def safetensors_header(path: _Path) -> tuple[dict[str, str], list[HeaderTensor]]:
    """A SafeTensors file's metadata and tensors, validated, in payload order."""

def zstd_header(path: _Path) -> tuple[dict[str, str], list[HeaderTensor]]:
    """A zstd container's metadata and tensors (each with its frame's offset and length and
    its decoded dtype, shape and size), validated, in payload order."""

def copy_into(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, threads: int | None = None
) -> None:
    """Copies `(source, destination)` arrays on every core, with the GIL released."""

def copy_from_dlpack(
    pairs: Sequence[tuple[object, np.ndarray]], *, threads: int | None = None
) -> None:
    """Copies `(DLPack capsule, destination)` pairs, with the GIL released: host tensors on
    every core, CUDA tensors in one batched device-to-host transfer (all pending device work
    waited for first, every copy queued, one wait). The capsules are not consumed."""

@final
class PinnedHost:
    """Host memory pinned for the CUDA driver; unpinned when this object is dropped."""

def cuda_available() -> bool:
    """Whether the CUDA driver (`libcuda.so.1`) loads and finds a device; `FASTCKPT_CUDA=0`
    says no."""

def pin_host(block: np.ndarray) -> PinnedHost | None:
    """Pins a writable C-contiguous array for device-to-host copies (None without CUDA)."""

def prefault(buffer: np.ndarray) -> Job:
    """Faults the array's pages in on a low-priority thread, without changing a byte."""

def reserve_spare(target: _Path, length: int, *, after: Sequence[Job] = ...) -> tuple[Path, Job]:
    """Reserves `length` bytes in a temp file beside `target`, on a low-priority thread
    once every job in `after` has ended; returns the file's path (known at once: a write
    may be queued behind the job to reuse it) and the job."""

def map_kept(path: _Path, length: int) -> Job | None:
    """For a file a write kept for the next one, which will write about `length` bytes
    into it: when it lives in memory and its mapping is not kept (it was there before
    training began), sizes it, maps it and touches its pages on a low-priority thread, for
    the next write into it; returns the job (which never fails), or None when there is
    nothing to do."""

def release_mappings(files: Sequence[tuple[int, int]] | None = None) -> int:
    """Lets go of the mappings this process keeps of files written again and again (on
    tmpfs, with `keep_replaced`), which hold the files' memory, even once the files are
    removed: those of the files `files` names as `(st_dev, st_ino)` pairs (every one when
    None), and those of removed files. Returns how many."""

def kept_mappings() -> int:
    """How many mappings of files written again and again this process keeps."""

@final
class KeptRegion:
    """The memory of a file in memory, lent from the mapping this process keeps of it, for
    a snapshot to copy each payload straight to its place in the file (`kept_region`).
    numpy arrays over it (`numpy.asarray(region)`) keep it, and so the mapping, alive."""

    @property
    def __array_interface__(self) -> dict[str, Any]:
        """numpy's array interface: the region as writable bytes, from the file's start."""

def kept_region(path: _Path, length: int = 0) -> KeptRegion | None:
    """The memory of `path`, a kept file in memory that this process writes through a
    kept mapping (a callback's spare, on tmpfs), lent for a snapshot to copy into: the next
    write into that file (`WriteOptions(reuse=path)`) then copies nothing of the payloads
    found at their places in it. At least `length` bytes (a shorter file is lengthened,
    with zeros, as far as its mapping spans). None where no mapping of it is kept (not in
    memory, not ready yet, or let go), or it cannot be that long.

    Stores into it must go to the next write of that file and nowhere else: until that
    write, the file's old content is overwritten in place."""

def sweep_stale_temps(folder: _Path) -> int:
    """Removes the temp files of dead fastckpt writers in `folder`; returns how many."""

def is_temp_name(name: _Path) -> bool:
    """Whether a file name is a fastckpt temp file."""
