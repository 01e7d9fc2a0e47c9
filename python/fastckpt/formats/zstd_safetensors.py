"""`.zst.safetensors`: the zstd container. A SafeTensors file in which every tensor is one
standard zstd frame (content size and checksum flags set) of a `.safetensors` tensor,
described in the header by `"decoded": {"dtype", "shape"}` beside the frame's own `U8`
entry; `__metadata__` is a `.safetensors` file's plus `"fastckpt.codec": "zstd"`, and the
CRC-32C per tensor is that of the decoded bytes. The stock `safetensors` package reads
each frame as the `uint8` array it is, and any zstd decoder decodes a frame on its own.
Frames are compressed in parallel while the file is written (`rust/core/src/format/
zstd.rs`, which documents the bytes) and decoded in parallel when it is read."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fastckpt import _fastckpt
from fastckpt.formats import SaveRequest
from fastckpt.formats._reading import Checkpoint, Groups, TensorInfo
from fastckpt.formats.safetensors import contents_metadata, groups_of, metadata
from fastckpt.formats.weights_h5 import tensors

if TYPE_CHECKING:
    from fastckpt.formats import Contents

CODEC_KEY = "fastckpt.codec"
LEVEL = _fastckpt.ZSTD_DEFAULT_LEVEL


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    return [
        _fastckpt.plan_zstd(
            request.path,
            tensors(request.plan, request.arrays),
            metadata(request.model, request.weights_only, request.plan),
            level=LEVEL,
        )
    ]


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    return [
        _fastckpt.plan_zstd(
            contents.path, contents.tensors, contents_metadata(contents), level=LEVEL
        )
    ]


def is_container(meta: dict[str, str]) -> bool:
    """Whether a SafeTensors file's metadata says it is a zstd container."""
    return meta.get(CODEC_KEY) == "zstd"


def open(path: str) -> Checkpoint:
    meta, entries = _fastckpt.zstd_header(path)
    found = {
        t.name: TensorInfo(t.dtype, tuple(t.shape), t.offset, t.nbytes, t.crc32c, stored=t.stored)
        for t in entries
    }
    return Checkpoint(path, found, meta, meta.get("keras.config"))


def extras(path: str) -> Groups:
    meta, _ = _fastckpt.zstd_header(path)
    return Groups(groups_of(meta))
