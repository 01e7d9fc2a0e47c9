"""What a checkpoint holds, without a model: `fastckpt inspect`."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from fastckpt import formats


def _legacy_h5_tensors(path: str) -> tuple[list[dict[str, Any]], bool]:
    import h5py

    out: list[dict[str, Any]] = []

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset):
            out.append(
                {
                    "name": name,
                    "dtype": obj.dtype.name,
                    "shape": list(obj.shape),
                    "bytes": int(np.prod(obj.shape, dtype=np.int64)) * obj.dtype.itemsize,
                }
            )

    with h5py.File(path, "r") as f:
        f.visititems(visit)
        has_config = "model_config" in f.attrs
    return out, has_config


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The format, size and tensors (name, dtype, shape, bytes; in a zstd container also
    `stored_bytes`, the frame's length) of a checkpoint file."""
    path = os.fspath(path)
    fmt = formats.format_for(path).name
    tensors: list[dict[str, Any]]
    if fmt == "legacy_h5":
        tensors, has_config = _legacy_h5_tensors(path)
    else:
        ckpt = formats.open_checkpoint(path)
        tensors = [
            {"name": name, "dtype": t.dtype, "shape": list(t.shape), "bytes": t.nbytes}
            | ({} if t.stored is None else {"stored_bytes": t.stored})
            for name, t in ckpt.tensors.items()
        ]
        has_config = ckpt.model_config is not None
    return {
        "path": path,
        "format": fmt,
        "file_bytes": os.path.getsize(path),
        "tensor_bytes": sum(t["bytes"] for t in tensors),
        "has_model_config": has_config,
        "tensors": tensors,
    }
