"""`.keras`: Keras 3's zip of `metadata.json`, `config.json`, `model.weights.h5` (the
`.weights.h5` tree) and `assets/...`, every member stored (uncompressed), as
`saving_lib.save_model` writes them. Written in one pass with the weights member planned
in place (`_fastckpt.plan_keras`); read in place, through a window on the archive."""

from __future__ import annotations

import builtins
import dataclasses
import datetime
import errno
import io
import json
import os
import struct
import zipfile
from typing import TYPE_CHECKING, Any

import h5py

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats import SaveRequest
from fastckpt.formats._hdf5 import (
    check_global_heaps,
    content_nodes,
    group_attrs,
    h5_fallback,
    h5_tensors,
)
from fastckpt.formats._reading import Checkpoint, Groups
from fastckpt.formats.weights_h5 import nodes, tensors

if TYPE_CHECKING:
    from fastckpt._walk import SavePlan
    from fastckpt.formats import Contents


def members(
    model: object, plan: SavePlan
) -> tuple[list[tuple[str, bytes]], list[tuple[str, bytes]]]:
    """The members around `model.weights.h5`: metadata and config before it, `assets/...`
    after it, as `saving_lib.save_model` writes them."""
    from fastckpt import _keras_private

    config_json, metadata_json = _keras_private.model_json(model)
    before = [("metadata.json", metadata_json.encode()), ("config.json", config_json.encode())]
    # Keras walks the whole model for assets on every save (most of the cost of a small
    # model's pause); only objects with `save_assets` ever write any, and which objects
    # those are changes only with the plan, so a plan without any skips the walk.
    if plan.has_assets is False:
        return before, []
    assets, asked = _keras_private.model_assets(model)
    plan.has_assets = asked
    return before, assets


def ready(model: object, plan: SavePlan) -> None:
    """Finds out ahead of the first save whether any object of `model` saves assets
    (`members`), where a walk of the model costs that save nothing (`Format.ready`)."""
    from fastckpt import _keras_private

    if plan.has_assets is None:
        plan.has_assets = _keras_private.model_assets(model)[1]


def plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]:
    before, after = members(request.model, request.plan)
    return [
        _fastckpt.plan_keras(
            request.path,
            tensors(request.plan, request.arrays),
            nodes(request.plan, request.arrays),
            before,
            after,
            weights_name=WEIGHTS_MEMBER,
        )
    ]


WEIGHTS_MEMBER = "model.weights.h5"


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    if contents.model_config is None:
        raise ValueError(
            f"A `.keras` file needs the model's config, and the source holds none (it has "
            f"weights only): convert it to `.weights.h5` or `.safetensors` instead. "
            f"Received: path={contents.path!r}"
        )
    keras_metadata = contents.keras_metadata or json.dumps(
        {
            "keras_version": contents.metadata.get("keras_version", "3"),
            "date_saved": datetime.datetime.now().strftime("%Y-%m-%d@%H:%M:%S"),
        }
    )
    before = [
        ("metadata.json", keras_metadata.encode()),
        ("config.json", contents.model_config.encode()),
    ]
    names = [name for name, _ in contents.tensors]
    nodes = content_nodes(contents.groups, names, contents.dtypes)
    return [
        _fastckpt.plan_keras(
            contents.path,
            contents.tensors,
            nodes,
            before,
            contents.assets,
            weights_name=WEIGHTS_MEMBER,
        )
    ]


def extras(path: str) -> Groups:
    """The weights member's groups, `metadata.json` and the `assets/...` members (each
    read into memory: assets are small files, vocabularies and the like)."""
    with zipfile.ZipFile(path) as zf:
        check_zip_members(path, zf)
        names = zf.namelist()
        meta = zf.read("metadata.json").decode("utf8") if "metadata.json" in names else None
        assets = [(n, zf.read(n)) for n in names if n.startswith("assets/") and not n.endswith("/")]
        info = zf.getinfo(WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED:
            base = _member_data_offset(path, info)
            check_global_heaps(path)
            with MemberWindow(path, base, info.file_size) as member, h5py.File(member, "r") as f:
                groups = group_attrs(f)
        else:
            # A compressed member cannot be scanned for malformed heaps (which string
            # attributes are read through): its groups' attributes are left behind.
            groups = []
    return Groups(groups, meta, assets)


def _member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a stored zip member's bytes begin: after its local header, whose name and
    extra-field lengths may differ from the central directory's (but not its name)."""
    with builtins.open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
        if len(header) != 30 or header[:4] != b"PK\x03\x04":
            raise CheckpointContentError(f"{path}: bad local header for {info.filename}")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        encoding = "utf8" if info.flag_bits & 0x800 else "cp437"
        if f.read(name_len) != info.orig_filename.encode(encoding):
            raise CheckpointContentError(
                f"{path}: the local header of {info.filename} names another member"
            )
    return int(info.header_offset + 30 + name_len + extra_len)


# Zip members read into memory (config.json) or through zipfile (a compressed weights file)
# may expand at most this much past a floor; Keras refuses the same (`_reject_zip_bomb`).
ZIP_BOMB_FLOOR_BYTES = 64 << 20
ZIP_MAX_EXPANSION = 100


def check_zip_members(path: str, zf: zipfile.ZipFile) -> None:
    """Refuses archives no Keras writer makes and that only an attack needs: member names
    that climb out of a folder or are absolute, duplicate names (which one is read depends
    on the reader), and members declaring far more bytes than they store."""
    seen = set()
    for info in zf.infolist():
        name = info.filename
        parts = name.replace("\\", "/").split("/")
        if name.startswith(("/", "\\")) or ".." in parts or ":" in parts[0] or "\0" in name:
            raise CheckpointContentError(f"{path}: unsafe member name {name!r} in the archive")
        if name in seen:
            raise CheckpointContentError(f"{path}: member {name!r} appears twice")
        seen.add(name)
        if (
            info.file_size > ZIP_BOMB_FLOOR_BYTES
            and info.file_size > ZIP_MAX_EXPANSION * info.compress_size
        ):
            raise CheckpointContentError(
                f"{path}: member {name!r} declares {info.file_size} bytes but stores "
                f"{info.compress_size}: refusing a decompression bomb"
            )


class MemberWindow(io.RawIOBase):
    """A stored zip member as a read-only, seekable file: bytes `[base, base + size)` of the
    archive, read in place with `pread`. zipfile's member stream re-reads the member from
    its start, re-computing its CRC, on every backward seek, and h5py seeks back often:
    opening a 480 MiB `.keras` that way took 0.37-0.49 s here."""

    def __init__(self, path: str, base: int, size: int) -> None:
        super().__init__()
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._base, self._size, self._pos = base, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        starts = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}
        if whence not in starts:
            raise ValueError(f"invalid whence ({whence}, should be 0, 1 or 2)")
        start = starts[whence]
        if start + offset < 0:
            raise OSError(errno.EINVAL, f"seek to {start + offset} before the member's start")
        self._pos = start + offset
        return self._pos

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        n = max(0, min(len(view), self._size - self._pos))
        done = 0
        while done < n:
            got = os.preadv(self._fd, [view[done:n]], self._base + self._pos + done)
            if got == 0:
                break  # the archive is shorter than its directory says
            done += got
        self._pos += done
        return done

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


def open(path: str) -> Checkpoint:
    with zipfile.ZipFile(path) as zf:
        check_zip_members(path, zf)
        names = zf.namelist()
        if WEIGHTS_MEMBER not in names:
            raise CheckpointContentError(f"{path}: no {WEIGHTS_MEMBER} in the archive")
        config = zf.read("config.json").decode("utf8") if "config.json" in names else None
        info = zf.getinfo(WEIGHTS_MEMBER)
        if info.compress_type == zipfile.ZIP_STORED:
            base = _member_data_offset(path, info)
            limit = base + info.file_size
            if info.compress_size != info.file_size or limit > os.path.getsize(path):
                raise CheckpointContentError(
                    f"{path}: {WEIGHTS_MEMBER} runs past the end of the file"
                )
            # Checked here, since the window bypasses zipfile's own CRC check.
            crc = _fastckpt.crc32_of_range(path, base, info.file_size)
            if crc != info.CRC:
                raise CheckpointContentError(
                    f"{path}: {WEIGHTS_MEMBER} fails its CRC-32 (the archive says "
                    f"{info.CRC:08x}, the data is {crc:08x}): the file is corrupt"
                )
            with MemberWindow(path, base, info.file_size) as member, h5py.File(member, "r") as f:
                found = h5_tensors(f, base, limit, path)
            size = info.file_size
            fallback = h5_fallback(
                lambda stack: stack.enter_context(MemberWindow(path, base, size))
            )
        else:
            with h5py.File(zf.open(WEIGHTS_MEMBER), "r") as f:
                found = {
                    n: dataclasses.replace(t, offset=-1)
                    for n, t in h5_tensors(f, 0, info.file_size, None).items()
                }
            # A compressed member is read through zipfile's stream.
            fallback = h5_fallback(
                lambda stack: stack.enter_context(
                    stack.enter_context(zipfile.ZipFile(path)).open(WEIGHTS_MEMBER)
                )
            )
    return Checkpoint(path, found, {}, config, fallback)
