"""`.shards.json`: a checkpoint that the processes of a multi-process training write
together, each the parts of the variables it holds, when a layout (`ModelParallel`) splits
a variable over processes and no process holds all of it.

Each process writes one SafeTensors file beside the index,
`<stem>.<token>-<process>-of-<count>.safetensors`, holding its parts of the values: a part
is a block of a value (`start` and `shape` in each dimension), named by the value's weight
path and its block (`layers/dense/vars/0[0:8,8:16]`), so that the stock `safetensors`
package reads every part. Each part of a value is written once, by one process (the
process of the first device that holds it). The index names every value's dtype, shape
and parts, and the groups of Keras's weights tree; it is written by process 0 once every
process's file is durable, and its rename commits the set. `token` is new for every save,
so a save never writes over the files the previous index names: until the new index
replaces it, the previous set is whole, whatever happened to the processes meanwhile.

Reading assembles each value from its parts (`Checkpoint.fallback`), whatever layout,
number of processes or backend reads it; the parts are checked to tile each value
exactly, and each part is read with its CRC-32C checked.
"""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from fastckpt import _fastckpt
from fastckpt._errors import CheckpointContentError
from fastckpt.formats._reading import (
    Checkpoint,
    Groups,
    TensorInfo,
    aligned_empty,
    numpy_dtype,
)

if TYPE_CHECKING:
    from fastckpt.formats import Contents

SUFFIX = ".shards.json"
FORMAT = "fastckpt.shards"
VERSION = 1
#: In each process's file's metadata: the index it belongs to (`fastckpt.latest` skips
#: such files: a part of a checkpoint is not one).
PART_OF = "fastckpt.part_of"
# An index larger than this is not one fastckpt wrote (it names a few parts per value).
_MAX_INDEX_BYTES = 256 << 20


@dataclasses.dataclass(frozen=True)
class Block:
    """One part of a value: `shape` elements from `start`, written by process `writer`."""

    start: tuple[int, ...]
    shape: tuple[int, ...]
    writer: int

    def name(self, path: str) -> str:
        """The part's tensor name in its file: the weight path and the block."""
        spans = ",".join(f"{a}:{a + n}" for a, n in zip(self.start, self.shape, strict=True))
        return f"{path}[{spans}]"

    def slices(self) -> tuple[slice, ...]:
        return _slices(self.start, self.shape)


def _slices(start: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(a, a + n) for a, n in zip(start, shape, strict=True))


def is_index(path: str) -> bool:
    return path.endswith(SUFFIX)


def part_path(index: str, token: str, process: int, count: int) -> str:
    """The file process `process` of `count` writes for the save `token` of `index`."""
    folder, name = os.path.split(index)
    stem = name[: -len(SUFFIX)]
    return os.path.join(folder, f"{stem}.{token}-{process:05d}-of-{count:05d}.safetensors")


def _part_pattern(index: str) -> re.Pattern[str]:
    stem = os.path.basename(index)[: -len(SUFFIX)]
    return re.compile(re.escape(stem) + r"\.[0-9a-f]{16}-\d{5}-of-\d{5}\.safetensors")


def stray_parts(index: str, keep: Sequence[str]) -> list[str]:
    """The part files beside `index` that its current set (`keep`) does not name: the
    previous set's, once a new index has replaced it, or those of a save that never
    committed."""
    folder = os.path.dirname(index) or "."
    pattern = _part_pattern(index)
    kept = {os.path.basename(p) for p in keep}
    return [
        os.path.join(os.path.dirname(index), n)
        for n in sorted(os.listdir(folder))
        if pattern.fullmatch(n) and n not in kept
    ]


def index_document(
    token: str,
    count: int,
    values: Sequence[tuple[str, str, tuple[int, ...], Sequence[Block]]],
    groups: list[tuple[str, dict[str, str]]],
    metadata: dict[str, str],
    index: str,
) -> bytes:
    """The index: every value `(weight path, dtype, shape, blocks)` with the file of each
    block (relative to the index's folder), the `vars` groups, and the metadata."""
    tensors = {}
    for path, dtype, shape, blocks in values:
        tensors[path] = {
            "dtype": dtype,
            "shape": list(shape),
            "parts": [
                {
                    "file": os.path.basename(part_path(index, token, b.writer, count)),
                    "tensor": b.name(path),
                    "start": list(b.start),
                    "shape": list(b.shape),
                }
                for b in blocks
            ],
        }
    document = {
        "format": FORMAT,
        "version": VERSION,
        "token": token,
        "processes": count,
        "metadata": metadata,
        "groups": [[path, attrs] for path, attrs in groups],
        "tensors": tensors,
    }
    return json.dumps(document, indent=1).encode()


@dataclasses.dataclass(frozen=True)
class _Part:
    file: str
    tensor: str
    start: tuple[int, ...]
    shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class _Index:
    files: list[str]
    tensors: dict[str, tuple[str, tuple[int, ...], list[_Part]]]
    groups: list[tuple[str, dict[str, str]]]
    metadata: dict[str, str]


def _read_index(path: str) -> _Index:
    """The index, checked: its structure, every part inside its value, and the parts of
    each value tiling it exactly (no gap, no overlap)."""

    def bad(why: str) -> CheckpointContentError:
        return CheckpointContentError(f"{path}: not a fastckpt shards index: {why}")

    if os.path.getsize(path) > _MAX_INDEX_BYTES:
        raise bad(f"larger than {_MAX_INDEX_BYTES} bytes")
    with builtins.open(path, "rb") as f:
        try:
            doc = json.loads(f.read())
        except ValueError as e:
            raise bad(f"invalid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise bad("no `format` of " + repr(FORMAT))
    if doc.get("version") != VERSION:
        raise bad(f"version {doc.get('version')!r}, this fastckpt reads {VERSION}")
    folder = os.path.dirname(path)
    files: list[str] = []
    tensors: dict[str, tuple[str, tuple[int, ...], list[_Part]]] = {}
    raw = doc.get("tensors")
    if not isinstance(raw, dict):
        raise bad("`tensors` is not an object")
    for name, spec in raw.items():
        try:
            dtype = str(spec["dtype"])
            numpy_dtype(dtype)
            shape = tuple(_naturals(spec["shape"]))
            parts = []
            for p in spec["parts"]:
                file = str(p["file"])
                if os.path.basename(file) != file or file in ("", ".", ".."):
                    raise bad(f"{name}: part file {file!r} is not a name beside the index")
                start, size = tuple(_naturals(p["start"])), tuple(_naturals(p["shape"]))
                parts.append(_Part(os.path.join(folder, file), str(p["tensor"]), start, size))
        except CheckpointContentError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"{name}: {e!r}") from None
        _check_tiling(path, name, shape, parts)
        for part in parts:
            if part.file not in files:
                files.append(part.file)
        tensors[str(name)] = (dtype, shape, parts)
    try:
        groups = [(str(g), {str(k): str(v) for k, v in a.items()}) for g, a in doc["groups"]]
        metadata = {str(k): str(v) for k, v in doc.get("metadata", {}).items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise bad(f"groups or metadata: {e!r}") from None
    return _Index(files, tensors, groups, metadata)


def _naturals(values: Any) -> list[int]:
    if not isinstance(values, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values
    ):
        raise ValueError(f"expected a list of non-negative integers, got {values!r}")
    return values


def _check_tiling(path: str, name: str, shape: tuple[int, ...], parts: list[_Part]) -> None:
    """Every part lies inside the value, and together they cover each element once."""
    total = 0
    for part in parts:
        if len(part.start) != len(shape) or len(part.shape) != len(shape):
            raise CheckpointContentError(f"{path}: {name}: part {part.tensor} has the wrong rank")
        if any(a + n > s for a, n, s in zip(part.start, part.shape, shape, strict=True)):
            raise CheckpointContentError(f"{path}: {name}: part {part.tensor} lies outside it")
        total += int(np.prod(part.shape, dtype=object))
    if total != int(np.prod(shape, dtype=object)):
        raise CheckpointContentError(
            f"{path}: {name}: its parts hold {total} elements, the value {np.prod(shape)}"
        )
    # Equal counts and no overlap between any two parts: an exact tiling.
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            if all(
                x0 < y0 + m and y0 < x0 + n
                for x0, n, y0, m in zip(a.start, a.shape, b.start, b.shape, strict=True)
            ):
                raise CheckpointContentError(
                    f"{path}: {name}: parts {a.tensor} and {b.tensor} overlap"
                )


def open(path: str) -> Checkpoint:
    """The index and the part files it names, beside it: every value located (read by
    assembling its parts), every part checked against its file."""
    from fastckpt.formats import safetensors

    index = _read_index(path)
    parts: dict[str, Checkpoint] = {}
    for file in index.files:
        if not os.path.exists(file):
            raise CheckpointContentError(
                f"{path}: the part file {os.path.basename(file)} it names is missing (a set "
                "is whole only with every file beside its index)"
            )
        parts[file] = safetensors.open(file)
    found: dict[str, TensorInfo] = {}
    for name, (dtype, shape, blocks) in index.tensors.items():
        for block in blocks:
            info = parts[block.file].tensors.get(block.tensor)
            if info is None:
                raise CheckpointContentError(f"{block.file}: no part {block.tensor} of {name}")
            if info.dtype != dtype or tuple(info.shape) != block.shape:
                raise CheckpointContentError(
                    f"{block.file}: part {block.tensor} is {info.dtype} {tuple(info.shape)}, "
                    f"the index says {dtype} {block.shape}"
                )
        nbytes = int(np.prod(shape, dtype=np.int64)) * numpy_dtype(dtype).itemsize
        found[name] = TensorInfo(dtype, shape, -1, nbytes)

    def assemble(name: str) -> np.ndarray:
        dtype, shape, blocks = index.tensors[name]
        out = aligned_empty(shape, numpy_dtype(dtype))
        for file, group in _by_file(blocks):
            values = parts[file].read([b.tensor for b in group])
            for block in group:
                out[_slices(block.start, block.shape)] = values[block.tensor]
        return out

    return Checkpoint(path, found, index.metadata, index.metadata.get("keras.config"), assemble)


def _by_file(blocks: list[_Part]) -> Iterator[tuple[str, list[_Part]]]:
    files: dict[str, list[_Part]] = {}
    for block in blocks:
        files.setdefault(block.file, []).append(block)
    yield from files.items()


def files_of(path: str) -> list[str]:
    """Every file of the set an index commits: the index first, then its parts."""
    return [path, *_read_index(path).files]


def extras(path: str) -> Groups:
    return Groups(_read_index(path).groups)


def plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]:
    """One process's set: every value whole in one part file, then the index (committed
    together, the index last)."""
    from fastckpt.formats.safetensors import contents_metadata

    token = os.urandom(8).hex()
    part = part_path(contents.path, token, 0, 1)
    whole = []
    named = []
    for (name, value), dtype in zip(contents.tensors, contents.dtypes, strict=True):
        shape = tuple(value.shape)
        block = Block((0,) * len(shape), shape, 0)
        whole.append((name, dtype, shape, [block]))
        named.append((block.name(name), value))
    metadata = contents_metadata(contents)
    part_meta = {PART_OF: os.path.basename(contents.path)}
    document = index_document(token, 1, whole, contents.groups, metadata, contents.path)
    return [
        _fastckpt.plan_safetensors(part, named, part_meta),
        _fastckpt.plan_bytes(contents.path, document),
    ]


def plan(request: Any) -> list[_fastckpt.PlannedFile]:
    raise ValueError(
        "a `.shards.json` save is written by every process together (`api.save_parts`); "
        "it has no single-process plan"
    )
