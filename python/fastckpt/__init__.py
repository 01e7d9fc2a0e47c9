"""fastckpt: durable, fast, background checkpoints for Keras.

`fastckpt.ModelCheckpoint` is a drop-in for `keras.callbacks.ModelCheckpoint` that saves in
the background; `save`, `load` and `load_model` are the same engine as a plain API, and
`convert` copies a checkpoint into another format.

Importing fastckpt imports neither Keras nor TensorFlow: the names below that need them
import them when first used (`fastckpt inspect` and `verify` run without Keras).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastckpt._errors import CheckpointContentError, CheckpointError, CheckpointNotFoundError

__version__ = "0.1.0"

__all__ = [
    "BackupAndRestore",
    "CheckpointContentError",
    "CheckpointError",
    "CheckpointNotFoundError",
    "ConvertResult",
    "ModelCheckpoint",
    "SaveJob",
    "SaveResult",
    "convert",
    "latest",
    "load",
    "load_model",
    "save",
    "save_async",
]

# Public name -> the module that defines it; imported on first use.
_LAZY = {
    "BackupAndRestore": "fastckpt.backup",
    "ConvertResult": "fastckpt.conversion",
    "convert": "fastckpt.conversion",
    "ModelCheckpoint": "fastckpt.callbacks",
    "latest": "fastckpt.api",
    "SaveJob": "fastckpt.api",
    "SaveResult": "fastckpt.api",
    "load": "fastckpt.api",
    "load_model": "fastckpt.api",
    "save": "fastckpt.api",
    "save_async": "fastckpt.api",
}

if TYPE_CHECKING:
    from fastckpt.api import SaveJob, SaveResult, latest, load, load_model, save, save_async
    from fastckpt.backup import BackupAndRestore
    from fastckpt.callbacks import ModelCheckpoint
    from fastckpt.conversion import ConvertResult, convert


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
