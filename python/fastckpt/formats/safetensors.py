"""`.safetensors`: the safetensors layout, tensor names the `.weights.h5` paths
(`layers/dense/vars/0`, `optimizer/vars/2`); `__metadata__` holds the format version, the
Keras version and backend, the model config JSON (unless weights only) and a CRC-32C per
tensor (which the native writer adds)."""

from __future__ import annotations

from fastckpt import _fastckpt
from fastckpt.formats import SaveRequest
from fastckpt.formats._reading import Checkpoint, TensorInfo
from fastckpt.formats.weights_h5 import tensors

FORMAT_VERSION = "1"


def metadata(model: object, weights_only: bool) -> dict[str, str]:
    """What fastckpt records about the model in `__metadata__`."""
    import keras

    from fastckpt import _keras_private

    meta = {
        "format": "fastckpt",
        "fastckpt.format_version": FORMAT_VERSION,
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }
    if not weights_only:
        meta["keras.config"], _ = _keras_private.model_json(model)
    return meta


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    return [
        _fastckpt.plan_safetensors(
            request.path,
            tensors(request.plan, request.arrays),
            metadata(request.model, request.weights_only),
        )
    ]


def open(path: str) -> Checkpoint:
    meta, entries = _fastckpt.safetensors_header(path)
    found = {
        t.name: TensorInfo(t.dtype, tuple(t.shape), t.offset, t.nbytes, t.crc32c) for t in entries
    }
    return Checkpoint(path, found, meta, meta.get("keras.config"))
