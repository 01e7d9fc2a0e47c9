"""Opening checkpoints for loading: what a file holds, where, and parallel reads of it.

Nothing a file says is trusted before it is checked: the native side validates headers and
every (offset, length) against the file's size, and checksums are verified when present.
"""

from __future__ import annotations

import dataclasses
import os

import ml_dtypes
import numpy as np

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

    def read(self, names: list[str], *, threads: int | None = None) -> dict[str, np.ndarray]:
        """Reads the named tensors in parallel into fresh arrays, checking checksums."""
        out = {}
        items = []
        for name in names:
            info = self.tensors[name]
            arr = np.empty(info.shape, dtype=numpy_dtype(info.dtype))
            out[name] = arr
            items.append((info.offset, arr))
        sums = _fastckpt.read_into(self.path, items, threads=threads, crc32c=True)
        for name, got in zip(names, sums, strict=True):
            want = self.tensors[name].crc32c
            if want is not None and want != got:
                raise CheckpointContentError(
                    f"{self.path}: checksum mismatch for {name} (file says {want:08x}, data "
                    f"is {got:08x}): the file is corrupt"
                )
        return out


def open_safetensors(path: str) -> Checkpoint:
    metadata, entries = _fastckpt.safetensors_header(path)
    tensors = {
        name: TensorInfo(dtype, tuple(shape), offset, nbytes, crc)
        for name, dtype, shape, offset, nbytes, crc in entries
    }
    return Checkpoint(path, tensors, metadata, metadata.get("keras.config"))


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Opens any checkpoint fastckpt reads, by suffix."""
    path = os.fspath(path)
    fmt = format_for(path)
    if fmt == "safetensors":
        return open_safetensors(path)
    raise ValueError(f"fastckpt does not read {fmt} files yet. Received: path={path!r}")
