"""`.safetensors`: the safetensors layout, tensor names the `.weights.h5` paths
(`layers/dense/vars/0`, `optimizer/vars/2`); `__metadata__` holds the format version, the
Keras version and backend, the model config JSON (unless weights only), the `vars` groups'
attributes (`fastckpt.groups`, so that a conversion back to HDF5 restores them) and a
CRC-32C per tensor (which the native writer adds)."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fastckpt import _fastckpt
from fastckpt.formats import SaveRequest
from fastckpt.formats._reading import Checkpoint, Groups, TensorInfo
from fastckpt.formats.weights_h5 import tensors

if TYPE_CHECKING:
    from fastckpt._walk import SavePlan
    from fastckpt.formats import Contents

FORMAT_VERSION = "1"
GROUPS_KEY = "fastckpt.groups"
# Metadata the writers add themselves, never carried over from a source.
_WRITER_KEYS = ("fastckpt.crc32c", "fastckpt.codec")


def metadata(model: object, weights_only: bool, plan: SavePlan | None = None) -> dict[str, str]:
    """What fastckpt records about the model in `__metadata__`."""
    import keras

    from fastckpt import _keras_private

    meta = {
        "format": "fastckpt",
        "fastckpt.format_version": FORMAT_VERSION,
        "keras_version": keras.__version__,
        "keras_backend": keras.backend.backend(),
    }
    if plan is not None:
        meta[GROUPS_KEY] = json.dumps(plan.groups, separators=(",", ":"))
    if not weights_only:
        meta["keras.config"], _ = _keras_private.model_json(model)
    return meta


def groups_of(meta: dict[str, str]) -> list[tuple[str, dict[str, str]]]:
    """The `vars` groups recorded in a file's metadata (none in files of other writers)."""
    try:
        found = json.loads(meta.get(GROUPS_KEY, "[]"))
        return [(str(path), {str(k): str(v) for k, v in attrs.items()}) for path, attrs in found]
    except (ValueError, TypeError, AttributeError):
        return []  # a malformed record only loses the attributes


def contents_metadata(contents: Contents) -> dict[str, str]:
    """`__metadata__` for a file converted from `contents`."""
    meta = {k: v for k, v in contents.metadata.items() if k not in _WRITER_KEYS}
    meta.pop("keras.config", None)
    meta.setdefault("format", "fastckpt")
    meta.setdefault("fastckpt.format_version", FORMAT_VERSION)
    meta[GROUPS_KEY] = json.dumps(contents.groups, separators=(",", ":"))
    if contents.model_config is not None:
        meta["keras.config"] = contents.model_config
    return meta


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    return [
        _fastckpt.plan_safetensors(
            request.path,
            tensors(request.plan, request.arrays),
            metadata(request.model, request.weights_only, request.plan),
        )
    ]


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    return [
        _fastckpt.plan_safetensors(contents.path, contents.tensors, contents_metadata(contents))
    ]


def open(path: str) -> Checkpoint:
    from fastckpt.formats import zstd_safetensors

    meta, entries = _fastckpt.safetensors_header(path)
    if zstd_safetensors.is_container(meta):
        return zstd_safetensors.open(path)  # a zstd container under a plain name
    found = {
        t.name: TensorInfo(t.dtype, tuple(t.shape), t.offset, t.nbytes, t.crc32c) for t in entries
    }
    return Checkpoint(path, found, meta, meta.get("keras.config"))


def extras(path: str) -> Groups:
    meta, _ = _fastckpt.safetensors_header(path)
    return Groups(groups_of(meta))
