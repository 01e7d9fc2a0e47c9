"""HDF5, as every HDF5-based format reads and lays it out: the checks that keep libhdf5 and
h5py safe on a hostile file, the walk that finds every dataset's payload, and the
`Node`/`Attr` trees the native writer plans (`_fastckpt.plan_hdf5`).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import h5py
import ml_dtypes
import numpy as np
from h5py import h5d, h5l, h5o

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats._reading import TensorInfo, numpy_dtype

# A dataset read through h5py (chunked, compressed, unallocated) may declare at most this
# many times the bytes it stores, past a floor: more is a shape or decompression bomb.
# Keras's own guard (saving_lib.safe_get_h5_dataset) uses the same ratio with a 4 GiB floor.
BOMB_FLOOR_BYTES = 64 << 20
BOMB_MAX_EXPANSION = 1000

# Kinds and sizes of numpy dtypes a checkpoint may hold (bool, ints, floats).
_PLAIN_KINDS = {"b": (1,), "i": (1, 2, 4, 8), "u": (1, 2, 4, 8), "f": (2, 4, 8)}


def h5_dtype(ds: h5py.Dataset) -> str:
    dt = ds.dtype
    # Keras stores bfloat16 as a 2-byte opaque type tagged dtype="bfloat16". The tag is a
    # variable-length string, the one kind of value whose reading goes through the global
    # heap (see check_global_heaps): read it only where it can matter.
    if dt.kind == "V" and dt.itemsize == 2 and ds.attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    if dt.kind not in _PLAIN_KINDS or dt.itemsize not in _PLAIN_KINDS[dt.kind]:
        raise CheckpointContentError(f"{ds.name}: unsupported dtype {dt} in a checkpoint")
    return str(dt.name)


_GCOL = b"GCOL\x01\x00\x00\x00"  # signature, version 1, three reserved bytes


def check_global_heaps(path: str, payloads: Sequence[tuple[int, int]] = ()) -> None:
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


def h5_tensors(
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

    def collect(name: bytes, info: Any) -> None:
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
    dtype = h5_dtype(h5py.Dataset(dsid))
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


def h5_fallback(source: Callable[[contextlib.ExitStack], Any]) -> Callable[[str], np.ndarray]:
    """Reads one dataset through h5py from what `source(stack)` opens (a path, or a file
    object entered on `stack`): for datasets the parallel reader cannot read."""

    def read(name: str) -> np.ndarray:
        with contextlib.ExitStack() as stack:
            f = stack.enter_context(h5py.File(source(stack), "r"))
            ds = f[name]
            return np.asarray(ds[()], dtype=numpy_dtype(h5_dtype(ds)))

    return read


# Writing: the tree the native writer plans ---------------------------------------------------


def attr(name: str, value: Any) -> _fastckpt.Attr:
    """An attribute as h5py would store the Python value Keras assigns."""
    if isinstance(value, str):
        return _fastckpt.Attr.Utf8(name, value)
    if isinstance(value, bytes):
        return _fastckpt.Attr.Bytes(name, value)
    if isinstance(value, np.ndarray) and value.dtype.kind == "S":
        return _fastckpt.Attr.FixedBytesArray(name, value.dtype.itemsize, [bytes(v) for v in value])
    if isinstance(value, (list, tuple)):
        if not value:
            return _fastckpt.Attr.EmptyList(name)
        if all(isinstance(v, bytes) for v in value):
            return _fastckpt.Attr.StrArray(name, [v.decode("utf8") for v in value])
    raise TypeError(f"fastckpt cannot store attribute {name!r} of type {type(value).__name__}")


def dataset_attrs(array: np.ndarray) -> list[_fastckpt.Attr]:
    """What Keras tags a dataset with: bfloat16 is stored opaque, with `dtype="bfloat16"`."""
    return [attr("dtype", "bfloat16")] if array.dtype == ml_dtypes.bfloat16 else []


def dtype_attrs(dtype: str) -> list[_fastckpt.Attr]:
    """`dataset_attrs` for a dataset of dtype `dtype` (by name)."""
    return [attr("dtype", "bfloat16")] if dtype == "bfloat16" else []


def content_nodes(
    groups: Sequence[tuple[str, dict[str, str]]], names: Sequence[str], dtypes: Sequence[str]
) -> list[_fastckpt.Node]:
    """The tree of a weights file holding datasets `names` (dataset `i` holds tensor `i`):
    the `groups` with their attributes, and any other group a dataset sits in."""
    out = [
        _fastckpt.Node(f"/{path}", None, [attr(k, v) for k, v in a.items()]) for path, a in groups
    ]
    made = {path for path, _ in groups}
    for i, (name, dtype) in enumerate(zip(names, dtypes, strict=True)):
        parent = name.rpartition("/")[0]
        if parent and parent not in made:
            out.append(_fastckpt.Node(f"/{parent}", None, []))
            made.add(parent)
        out.append(_fastckpt.Node(f"/{name}", i, dtype_attrs(dtype)))
    return out


def group_attrs(f: h5py.File) -> list[tuple[str, dict[str, str]]]:
    """Every group's string attributes (Keras's `vars` groups carry `name`), in h5py's
    order. Call `check_global_heaps` on the file first: string attributes are read."""
    found: list[tuple[str, dict[str, str]]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "vars":
            attrs = {}
            for key, value in obj.attrs.items():
                if isinstance(value, bytes):
                    value = value.decode("utf8", errors="replace")
                if isinstance(value, str):
                    attrs[str(key)] = value
            found.append((name, attrs))

    f.visititems(visit)
    return found
