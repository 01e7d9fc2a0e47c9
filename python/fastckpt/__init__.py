"""fastckpt: durable, fast, background checkpoints for Keras.

`fastckpt.ModelCheckpoint` is a drop-in for `keras.callbacks.ModelCheckpoint` that saves in
the background; `save`, `load` and `load_model` are the same engine as a plain API.
"""

from fastckpt._compat import check_keras_version as _check_keras_version

_check_keras_version()

from fastckpt._errors import CheckpointContentError, CheckpointError  # noqa: E402
from fastckpt.api import SaveJob, SaveResult, load, load_model, save  # noqa: E402
from fastckpt.callbacks import ModelCheckpoint  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "CheckpointContentError",
    "CheckpointError",
    "ModelCheckpoint",
    "SaveJob",
    "SaveResult",
    "load",
    "load_model",
    "save",
]
