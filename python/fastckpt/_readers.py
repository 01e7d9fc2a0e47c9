"""Opening checkpoints for loading: what a file holds, where, and parallel reads of it.

Nothing a file says is trusted before it is checked: the native side validates headers and
every (offset, length) against the file's size, and checksums are verified when present.
"""

from __future__ import annotations

import dataclasses
import os
import struct
import zipfile
from collections.abc import Callable

import h5py
import ml_dtypes
import numpy as np
from h5py import h5d, h5o

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
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


def _h5_dtype(ds: h5py.Dataset) -> str:
    if ds.dtype.kind == "V" and ds.attrs.get("dtype") == "bfloat16":
        return "bfloat16"
    return ds.dtype.name


def _h5_tensors(f: h5py.File, base: int, limit: int) -> dict[str, TensorInfo]:
    """Every dataset of a Keras weights tree with the absolute offset of its payload, or
    -1 where it cannot be read directly (chunked, filtered or external storage).

    Uses h5py's low-level API: the high-level `visititems` builds a Python object per
    member and costs 4x more on models with thousands of variables. `H5Ovisit` follows
    hard links only, so soft and external links are never followed.
    """
    names: list[bytes] = []

    def collect(name: bytes, info) -> None:
        if info.type == h5o.TYPE_DATASET:
            names.append(name)

    h5o.visit(f.id, collect, info=True)
    tensors: dict[str, TensorInfo] = {}
    for raw in names:
        name = raw.decode("utf8")
        dsid = h5d.open(f.id, raw)
        dtype = dsid.dtype.name
        if dsid.dtype.kind == "V":
            dtype = _h5_dtype(h5py.Dataset(dsid))
        shape = tuple(dsid.shape)
        try:
            itemsize = numpy_dtype(dtype).itemsize
        except TypeError as e:
            raise CheckpointContentError(f"{name}: unsupported dtype {dtype}") from e
        nbytes = int(np.prod(shape, dtype=np.int64)) * itemsize
        plist = dsid.get_create_plist()
        plain = (
            plist.get_layout() == h5d.CONTIGUOUS
            and plist.get_nfilters() == 0
            and plist.get_external_count() == 0
        )
        offset = dsid.get_offset()
        if nbytes == 0:
            offset = 0
        elif offset is None or not plain:
            offset = -1
        else:
            offset += base
            if offset + nbytes > limit:
                raise CheckpointContentError(
                    f"{name}: {nbytes} bytes at offset {offset} lie past the end of the data "
                    f"({limit} bytes)"
                )
        tensors[name] = TensorInfo(dtype, shape, offset, nbytes)
    return tensors


def _h5_fallback(path: str, member: str | None) -> Callable[[str], np.ndarray]:
    def read(name: str) -> np.ndarray:
        if member is None:
            with h5py.File(path, "r") as f:
                ds = f[name]
                return np.asarray(ds[()], dtype=numpy_dtype(_h5_dtype(ds)))
        with zipfile.ZipFile(path) as zf, h5py.File(zf.open(member), "r") as f:
            ds = f[name]
            return np.asarray(ds[()], dtype=numpy_dtype(_h5_dtype(ds)))

    return read


def open_sharded(path: str) -> Checkpoint:
    """A `.weights.json` index and its `_00000.weights.h5` shards, beside it."""
    import json

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
            for key, info in _h5_tensors(f, 0, os.path.getsize(shard)).items():
                if info.offset < 0:
                    raise CheckpointContentError(f"{shard}: {key} is not stored contiguously")
                tensors[key] = dataclasses.replace(info, file=shard)
    return Checkpoint(path, tensors, {}, None)


def open_weights_h5(path: str) -> Checkpoint:
    with h5py.File(path, "r") as f:
        tensors = _h5_tensors(f, 0, os.path.getsize(path))
    return Checkpoint(path, tensors, {}, None, _h5_fallback(path, None))


WEIGHTS_MEMBER = "model.weights.h5"


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, whose name and
    extra-field lengths may differ from the central directory's."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointContentError(f"{path}: bad local header for {info.filename}")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def open_keras(path: str) -> Checkpoint:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        if WEIGHTS_MEMBER not in names:
            raise CheckpointContentError(f"{path}: no {WEIGHTS_MEMBER} in the archive")
        config = zf.read("config.json").decode("utf8") if "config.json" in names else None
        info = zf.getinfo(WEIGHTS_MEMBER)
        with h5py.File(zf.open(WEIGHTS_MEMBER), "r") as f:
            if info.compress_type == zipfile.ZIP_STORED:
                base = _member_data_offset(path, info)
                limit = base + info.file_size
                if limit > os.path.getsize(path):
                    raise CheckpointContentError(
                        f"{path}: {WEIGHTS_MEMBER} runs past the end of the file"
                    )
                tensors = _h5_tensors(f, base, limit)
            else:
                tensors = {
                    n: dataclasses.replace(t, offset=-1)
                    for n, t in _h5_tensors(f, 0, info.file_size).items()
                }
    return Checkpoint(path, tensors, {}, config, _h5_fallback(path, WEIGHTS_MEMBER))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Opens a checkpoint in the Keras weights layout (`.safetensors`, `.weights.h5`,
    `.keras`), by suffix. Legacy `.h5` files have their own layout: see `api.load`."""
    path = os.fspath(path)
    fmt = format_for(path)
    if fmt == "safetensors":
        return open_safetensors(path)
    if fmt == "weights_h5":
        return open_weights_h5(path)
    if fmt == "weights_sharded":
        return open_sharded(path)
    if fmt == "keras":
        return open_keras(path)
    raise ValueError(f"{path} is a legacy full-model HDF5 file: it has no Keras weights tree")
