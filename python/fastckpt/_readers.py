"""Opening checkpoints for loading: what a file holds, where, and parallel reads of it.

Nothing a file says is trusted before it is checked: the native side validates headers and
every (offset, length) against the file's size, and checksums are verified when present.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import io
import json
import mmap
import os
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator

import h5py
import ml_dtypes
import numpy as np
from h5py import h5d, h5l, h5o

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError, CheckpointError
from fastckpt._formats import format_for


def numpy_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    crc32c: int | None = None
    file: str | None = None  # for sharded checkpoints: the shard holding it


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

    def read(self, names: list[str], *, threads: int | None = None) -> dict[str, np.ndarray]:
        """Reads the named tensors in parallel into fresh arrays, checking checksums."""
        out = {}
        by_file: dict[str, list[tuple[str, np.ndarray]]] = {}
        for name in names:
            info = self.tensors[name]
            if info.offset < 0:
                assert self.fallback is not None
                with content_errors(self.path):
                    out[name] = self.fallback(name)
                continue
            arr = np.empty(info.shape, dtype=numpy_dtype(info.dtype))
            out[name] = arr
            by_file.setdefault(info.file or self.path, []).append((name, arr))
        for path, pairs in by_file.items():
            items = [(self.tensors[name].offset, arr) for name, arr in pairs]
            sums = _fastckpt.read_into(path, items, threads=threads, crc32c=True)
            self._check_sums([name for name, _ in pairs], sums)
        return out

    def _check_sums(self, direct: list[str], sums: list[int]) -> None:
        for name, got in zip(direct, sums, strict=True):
            want = self.tensors[name].crc32c
            if want is not None and want != got:
                raise CheckpointContentError(
                    f"{self.path}: checksum mismatch for {name} (file says {want:08x}, data "
                    f"is {got:08x}): the file is corrupt"
                )


def open_safetensors(path: str) -> Checkpoint:
    metadata, entries = _fastckpt.safetensors_header(path)
    tensors = {
        name: TensorInfo(dtype, tuple(shape), offset, nbytes, crc)
        for name, dtype, shape, offset, nbytes, crc in entries
    }
    return Checkpoint(path, tensors, metadata, metadata.get("keras.config"))


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


# A dataset read through h5py (chunked, compressed, unallocated) may declare at most this
# many times the bytes it stores, past a floor: more is a shape or decompression bomb.
# Keras's own guard (saving_lib.safe_get_h5_dataset) uses the same ratio with a 4 GiB floor.
BOMB_FLOOR_BYTES = 64 << 20
BOMB_MAX_EXPANSION = 1000

# Kinds and sizes of numpy dtypes a checkpoint may hold (bool, ints, floats).
_PLAIN_KINDS = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}


def _h5_dtype(ds: h5py.Dataset) -> str:
    dt = ds.dtype
    # Keras stores bfloat16 as a 2-byte opaque type tagged dtype="bfloat16". The tag is a
    # variable-length string, the one kind of value whose reading goes through the global
    # heap (see check_global_heaps): read it only where it can matter.
    if dt.kind == "V" and dt.itemsize == 2 and ds.attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    if dt.kind not in _PLAIN_KINDS or dt.itemsize not in _PLAIN_KINDS[dt.kind]:
        raise CheckpointContentError(f"{ds.name}: unsupported dtype {dt} in a checkpoint")
    return dt.name


_GCOL = b"GCOL\x01\x00\x00\x00"  # signature, version 1, three reserved bytes


def check_global_heaps(path: str, payloads: list[tuple[int, int]] = ()) -> None:
    """Walks every global heap collection in the file the way libhdf5 will, and refuses
    the file if one is malformed. libhdf5 1.14 (h5py's) loops forever on a heap object
    of size 0 when it reads a variable-length string (an attribute such as Keras's
    `model_config` or a bfloat16 tag), so this check must run before such a read.

    `payloads` are `(offset, length)` ranges of dataset data, which hold no heap: only
    the rest of the file (its metadata) is scanned."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < len(_GCOL):
            return
        gaps, at = [], 0
        for offset, length in sorted(payloads):
            if offset > at:
                gaps.append((at, offset))
            at = max(at, offset + length)
        gaps.append((at, size))
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            for start, end in gaps:
                hit = m.find(_GCOL, start, end)
                while hit >= 0:
                    _walk_global_heap(path, m, hit, size)
                    hit = m.find(_GCOL, hit + 1, end)


def _walk_global_heap(path: str, m: mmap.mmap, at: int, file_size: int) -> None:
    def bad(why: str) -> CheckpointContentError:
        return CheckpointContentError(f"{path}: malformed global heap at {at}: {why}")

    if at + 16 > file_size:
        raise bad("truncated")
    (length,) = struct.unpack_from("<Q", m, at + 8)
    if length < 4096 or at + length > file_size:
        raise bad(f"collection size {length}")
    p, end = at + 16, at + length
    while p < end:
        if p + 16 > end:
            break  # too small for an object: libhdf5 takes it as free space
        idx, _, _, obj_size = struct.unpack_from("<HHIQ", m, p)
        need = 16 + (obj_size + 7) // 8 * 8 if idx > 0 else obj_size
        if need < 16 or p + need > end:
            raise bad(f"object {idx} of {obj_size} bytes at {p}")
        p += need


def check_h5_links(f: h5py.Group) -> None:
    """Refuses what Keras refuses (`saving_lib.safe_get_h5_group`): soft and external links,
    which can alias other objects or read other files (H5Lvisit through the low-level API:
    no Python object per link)."""
    # h5py's visit callbacks must not raise (h5py turns it into a SystemError): a non-None
    # return value stops the walk instead.
    found = f.id.links.visit(
        lambda name, info: name if info.type != h5l.TYPE_HARD else None, info=True
    )
    if found is not None:
        raise CheckpointContentError(
            f"{f.file.filename}: a soft or external link at /{found.decode(errors='replace')} "
            "is not allowed in a checkpoint"
        )


def _h5_tensors(
    f: h5py.File, base: int, limit: int, heaps: str | None, all_strings: bool = False
) -> dict[str, TensorInfo]:
    """Every dataset of a Keras weights tree with the absolute offset of its payload, or
    -1 where h5py must read it (chunked, filtered, big-endian or unallocated storage).
    Nothing the file declares is trusted: links, dtypes and sizes are checked first.

    `heaps`: the file to scan for global heaps (see check_global_heaps), None if it
    cannot be scanned (a compressed zip member); scanned when a dataset may carry a
    bfloat16 tag, or always with `all_strings` (string attributes will be read).

    Uses h5py's low-level API: the high-level `visititems` builds a Python object per
    member and costs 4x more on models with thousands of variables.
    """
    check_h5_links(f)
    names: list[bytes] = []

    def collect(name: bytes, info) -> None:
        if info.type == h5o.TYPE_DATASET:
            names.append(name)

    h5o.visit(f.id, collect, info=True)
    datasets = [(raw.decode("utf8"), h5d.open(f.id, raw)) for raw in names]
    if heaps is not None and (all_strings or any(d.dtype.kind == "V" for _, d in datasets)):
        payloads = []
        for _, dsid in datasets:
            offset = dsid.get_offset()
            if offset is not None:
                payloads.append((base + offset, dsid.get_storage_size()))
        check_global_heaps(heaps, payloads)  # before _h5_dtype reads a bfloat16 tag
    return {name: _h5_tensor(name, dsid, base, limit) for name, dsid in datasets}


def _h5_tensor(name: str, dsid: h5d.DatasetID, base: int, limit: int) -> TensorInfo:
    """One dataset's dtype, shape and payload offset; external and virtual datasets
    (whose data lives in other files), unsupported dtypes and bombs are refused."""
    plist = dsid.get_create_plist()
    layout = plist.get_layout()
    if plist.get_external_count() > 0 or layout == h5d.VIRTUAL:
        raise CheckpointContentError(
            f"{name}: external and virtual datasets read other files and are not allowed "
            "in a checkpoint"
        )
    dtype = _h5_dtype(h5py.Dataset(dsid))
    shape = tuple(dsid.shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
    if nbytes < 0 or any(d < 0 for d in shape):
        raise CheckpointContentError(f"{name}: impossible shape {shape}")
    plain = (
        layout == h5d.CONTIGUOUS
        and plist.get_nfilters() == 0
        and dsid.dtype.byteorder in ("<", "=", "|")
    )
    offset = dsid.get_offset()
    if nbytes == 0:
        offset = 0
    elif offset is None or not plain:
        stored = dsid.get_storage_size()
        if nbytes > BOMB_FLOOR_BYTES and nbytes > BOMB_MAX_EXPANSION * stored:
            raise CheckpointContentError(
                f"{name}: declares {nbytes} bytes but stores {stored}: refusing a shape or "
                "decompression bomb"
            )
        offset = -1
    else:
        offset += base
        if offset + nbytes > limit:
            raise CheckpointContentError(
                f"{name}: {nbytes} bytes at offset {offset} lie past the end of the data "
                f"({limit} bytes)"
            )
    return TensorInfo(dtype, shape, offset, nbytes)


def _h5_fallback(path: str, window: tuple[int, int] | None = None) -> Callable[[str], np.ndarray]:
    """Reads a dataset through h5py: from the file, or from the `(base, size)` window of a
    `.keras` archive holding its stored weights member."""

    def read(name: str) -> np.ndarray:
        with contextlib.ExitStack() as stack:
            source = path if window is None else stack.enter_context(MemberWindow(path, *window))
            f = stack.enter_context(h5py.File(source, "r"))
            ds = f[name]
            return np.asarray(ds[()], dtype=numpy_dtype(_h5_dtype(ds)))

    return read


def _h5_zip_fallback(path: str, member: str) -> Callable[[str], np.ndarray]:
    """Reads a dataset of a compressed zip member through zipfile's stream."""

    def read(name: str) -> np.ndarray:
        with zipfile.ZipFile(path) as zf, h5py.File(zf.open(member), "r") as f:
            ds = f[name]
            return np.asarray(ds[()], dtype=numpy_dtype(_h5_dtype(ds)))

    return read


def open_sharded(path: str) -> Checkpoint:
    """A `.weights.json` index and its `_00000.weights.h5` shards, beside it."""
    with open(path, "rb") as f:
        index = json.load(f)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointContentError(f"{path}: not a sharded weights index (no weight_map)")
    shards: list[str] = []
    for files in weight_map.values():
        for name in files if isinstance(files, list) else [files]:
            if (
                not isinstance(name, str)
                or os.path.basename(name) != name
                or name in ("", ".", "..")
            ):
                raise CheckpointContentError(f"{path}: bad shard name {name!r} in the index")
            if name not in shards:
                shards.append(name)
    folder = os.path.dirname(path)
    tensors: dict[str, TensorInfo] = {}
    for name in shards:
        shard = os.path.join(folder, name)
        with h5py.File(shard, "r") as f:
            for key, info in _h5_tensors(f, 0, os.path.getsize(shard), shard).items():
                if info.offset < 0:
                    raise CheckpointContentError(f"{shard}: {key} is not stored contiguously")
                tensors[key] = dataclasses.replace(info, file=shard)
    return Checkpoint(path, tensors, {}, None)


def open_weights_h5(path: str) -> Checkpoint:
    with h5py.File(path, "r") as f:
        tensors = _h5_tensors(f, 0, os.path.getsize(path), path)
    return Checkpoint(path, tensors, {}, None, _h5_fallback(path))


WEIGHTS_MEMBER = "model.weights.h5"


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, whose name and
    extra-field lengths may differ from the central directory's (but not its name)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointContentError(f"{path}: bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        encoding = "utf8" if info.flag_bits & 0x800 else "cp437"
        if f.read(name_len) != info.orig_filename.encode(encoding):
            raise CheckpointContentError(
                f"{path}: the local header of {info.filename} names another member"
            )
    return info.header_offset + 30 + name_len + extra_len


# Zip members read into memory (config.json) or through zipfile (a compressed weights file)
# may expand at most this much past a floor; Keras refuses the same (`_reject_zip_bomb`).
ZIP_BOMB_FLOOR_BYTES = 64 << 20
ZIP_MAX_EXPANSION = 100


def check_zip_members(path: str, zf: zipfile.ZipFile) -> None:
    """Refuses archives no Keras writer makes and that only an attack needs: member names
    that climb out of a folder or are absolute, duplicate names (which one is read depends
    on the reader), and members declaring far more bytes than they store."""
    seen = set()
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or "\0" in name:
            raise CheckpointContentError(f"{path}: unsafe member name {name!r} in the archive")
        if name in seen:
            raise CheckpointContentError(f"{path}: member {name!r} appears twice")
        seen.add(name)
        if (
            info.file_size > ZIP_BOMB_FLOOR_BYTES
            and info.file_size > ZIP_MAX_EXPANSION * info.compress_size
        ):
            raise CheckpointContentError(
                f"{path}: member {name!r} declares {info.file_size} bytes but stores "
                f"{info.compress_size}: refusing a decompression bomb"
            )


class MemberWindow(io.RawIOBase):
    """A stored zip member as a read-only, seekable file: bytes `[base, base + size)` of the
    archive, read in place with `pread`. zipfile's member stream re-reads the member from
    its start, re-computing its CRC, on every backward seek, and h5py seeks back often:
    opening a 480 MiB `.keras` that way took 0.37-0.49 s here."""

    def __init__(self, path: str, base: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._base, self._size, self._pos = base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        starts = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}
        if whence not in starts:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        start = starts[whence]
        if start + offset < 0:
            raise OSError(errno.EINVAL, f"seek to {start + offset} before the member's start")
        self._pos = start + offset
        return self._pos

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], self._base + self._pos + done)
            if got == 0:
                break  # the archive is shorter than its directory says
            done += got
        self._pos += done
        return done

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open_keras(path: str) -> Checkpoint:
    with zipfile.ZipFile(path) as zf:
        check_zip_members(path, zf)
        names = zf.namelist()
        if WEIGHTS_MEMBER not in names:
            raise CheckpointContentError(f"{path}: no {WEIGHTS_MEMBER} in the archive")
        config = zf.read("config.json").decode("utf8") if "config.json" in names else None
        info = zf.getinfo(WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED:
            base = _member_data_offset(path, info)
            limit = base + info.file_size
            if info.compress_size != info.file_size or limit > os.path.getsize(path):
                raise CheckpointContentError(
                    f"{path}: {WEIGHTS_MEMBER} runs past the end of the file"
                )
            # Checked here, since the window bypasses zipfile's own CRC check.
            crc = _fastckpt.crc32_of_range(path, base, info.file_size)
            if crc != info.CRC:
                raise CheckpointContentError(
                    f"{path}: {WEIGHTS_MEMBER} fails its CRC-32 (the archive says "
                    f"{info.CRC:08x}, the data is {crc:08x}): the file is corrupt"
                )
            with MemberWindow(path, base, info.file_size) as member, h5py.File(member, "r") as f:
                tensors = _h5_tensors(f, base, limit, path)
            fallback = _h5_fallback(path, (base, info.file_size))
        else:
            with h5py.File(zf.open(WEIGHTS_MEMBER), "r") as f:
                tensors = {
                    n: dataclasses.replace(t, offset=-1)
                    for n, t in _h5_tensors(f, 0, info.file_size, None).items()
                }
            fallback = _h5_zip_fallback(path, WEIGHTS_MEMBER)
    return Checkpoint(path, tensors, {}, config, fallback)


def open_legacy_h5(path: str) -> Checkpoint:
    """A legacy full-model `.h5`: every dataset by its path in the file (for verifying and
    inspecting; `api.load` loads this layout through Keras's own legacy loader)."""
    with h5py.File(path, "r") as f:
        # Keras's legacy loader reads every string attribute
        tensors = _h5_tensors(f, 0, os.path.getsize(path), path, all_strings=True)
    return Checkpoint(path, tensors, {}, None, _h5_fallback(path))


def open_checkpoint(path: str | os.PathLike, *, legacy: bool = False) -> Checkpoint:
    """Opens a checkpoint in the Keras weights layout (`.safetensors`, `.weights.h5`,
    `.weights.json`, `.keras`), by suffix; with `legacy`, also a legacy full-model `.h5`
    (whose layout `api.load` hands to Keras's legacy loader).

    Raises:
        CheckpointContentError: the file is damaged, hostile or not a checkpoint.
        OSError: the file cannot be read (FileNotFoundError, PermissionError, ...).
    """
    path = os.fspath(path)
    fmt = format_for(path)
    os.stat(path)  # a missing or unreadable file is an OSError, not a content error
    with content_errors(path):
        if fmt == "safetensors":
            return open_safetensors(path)
        if fmt == "weights_h5":
            return open_weights_h5(path)
        if fmt == "weights_sharded":
            return open_sharded(path)
        if fmt == "keras":
            return open_keras(path)
        if legacy:
            return open_legacy_h5(path)
    raise ValueError(f"{path} is a legacy full-model HDF5 file: it has no Keras weights tree")
