"""Which format a path asks for, by suffix."""

from __future__ import annotations

import os

# Longest suffixes first: "x.weights.h5" is a weights file, "x.h5" a legacy full model.
SUFFIXES: dict[str, str] = {
    ".weights.h5": "weights_h5",
    ".weights.json": "weights_sharded",
    ".safetensors": "safetensors",
    ".keras": "keras",
    ".h5": "legacy_h5",
    ".hdf5": "legacy_h5",
}


def format_for(path: str | os.PathLike) -> str:
    """The format name for `path`; ValueError listing the supported suffixes otherwise."""
    name = os.fspath(path)
    for suffix, fmt in SUFFIXES.items():
        if name.endswith(suffix):
            return fmt
    raise ValueError(
        f"fastckpt cannot tell the checkpoint format from the file name: it must end in "
        f"one of {', '.join(SUFFIXES)}. Received: path={name!r}"
    )
