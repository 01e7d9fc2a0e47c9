"""The one format table: every checkpoint format once, with its suffixes, how a save of it
is planned (its layout builder and native writer) and how a file of it is opened.

Each format is a module of this package (`weights_h5`, `sharded`, `safetensors`,
`zstd_safetensors`, `keras_zip`, `legacy_h5`, `process_shards`), mirroring
`rust/core/src/format/` (`process_shards` is SafeTensors files and a JSON index), with:

- `plan(request: SaveRequest) -> list[_fastckpt.PlannedFile]`: the files of one save, laid
  out to the byte; several files commit together, the last one last (a sharded index).
- `open(path: str) -> Checkpoint`: the file opened for reading, every tensor located and
  checked.
- for the formats in the Keras weights layout, what `fastckpt convert` needs:
  `extras(path) -> Groups` (the `vars` groups' attributes, a `.keras` file's metadata and
  assets) and `plan_contents(contents: Contents) -> list[_fastckpt.PlannedFile]` (the
  files holding another checkpoint's tensors, which are copied as the file is written).

A module is imported when its format is first used; reading never imports Keras. Adding a
format is one module and one entry in `FORMATS`.
"""

from __future__ import annotations

import dataclasses
import errno
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING, Any

from fastckpt._errors import CheckpointNotFoundError
from fastckpt.formats._reading import (
    Checkpoint,
    Groups,
    TensorInfo,
    content_errors,
    numpy_dtype,
)

if TYPE_CHECKING:
    import numpy as np

    from fastckpt import _fastckpt
    from fastckpt._walk import SavePlan

__all__ = [
    "EXTRA_GROUP",
    "FORMATS",
    "Checkpoint",
    "Contents",
    "Extra",
    "Format",
    "Groups",
    "SaveRequest",
    "TensorInfo",
    "by_name",
    "check_target",
    "content_errors",
    "format_for",
    "numpy_dtype",
    "open_checkpoint",
]


@dataclasses.dataclass(frozen=True)
class Extra:
    """What fastckpt adds to a `.weights.h5` file beside Keras's tree: string attributes of
    the root group, and tensors under the reserved top-level group `EXTRA_GROUP`, which
    Keras's loader never visits and fastckpt's reads apart (`Checkpoint.extras`).

    Attributes:
        attrs: root attributes, name -> text.
        tensors: `(name, array)`, stored as `EXTRA_GROUP/name`.
    """

    attrs: dict[str, str] = dataclasses.field(default_factory=dict)
    tensors: list[tuple[str, np.ndarray]] = dataclasses.field(default_factory=list)


#: The top-level group of a `.weights.h5` file that holds fastckpt's own tensors.
EXTRA_GROUP = "fastckpt"


@dataclasses.dataclass(frozen=True)
class SaveRequest:
    """One save of a model, as a format's `plan` sees it.

    Attributes:
        model: the Keras model.
        path: the file asked for (for sharded weights, the index).
        plan: what the save holds (`_walk.SavePlan`).
        arrays: the snapshot, one array per plan entry (empty for formats that read the
            values themselves).
        weights_only: leave the model config out (formats that can hold it).
        max_shard_size: for sharded weights, the largest shard in GB.
        extra: fastckpt's own attributes and tensors (`.weights.h5` only).
    """

    model: Any
    path: str
    plan: SavePlan
    arrays: list[np.ndarray]
    weights_only: bool = False
    max_shard_size: float | None = None
    extra: Extra | None = None


@dataclasses.dataclass(frozen=True)
class Contents:
    """A checkpoint's contents, to be written in another format (`fastckpt convert`).

    Attributes:
        path: the file to write (for sharded weights, the index).
        tensors: `(weight path, value)` in the source's order; a value is a numpy array or
            a `_fastckpt.SourceTensor`, read from the source as the file is written.
        dtypes: each tensor's dtype name.
        groups: the Keras `vars` groups with their attributes.
        model_config: the model's config JSON, when the source has one.
        metadata: the source's string metadata (Keras version and backend).
        keras_metadata: a `.keras` source's `metadata.json`.
        assets: a `.keras` source's `assets/...` members.
        max_shard_size: for sharded weights, the largest shard in GB.
    """

    path: str
    tensors: list[tuple[str, Any]]
    dtypes: list[str]
    groups: list[tuple[str, dict[str, str]]]
    model_config: str | None = None
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    keras_metadata: str | None = None
    assets: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)
    max_shard_size: float | None = None


@dataclasses.dataclass(frozen=True)
class Format:
    """One checkpoint format.

    Attributes:
        name: how `save(format=...)` names it.
        suffixes: the file name endings that choose it.
        module: the module with its `plan` and `open`.
        holds_model: a file carries the model's config, so `load_model` can rebuild it.
        sharded: a save is split into shards of `max_shard_size`, which it needs.
        keras_layout: the file holds Keras's weights tree (`layers/dense/vars/0` ...), which
            `load` reads itself; the legacy layout goes through Keras's legacy loader.
    """

    name: str
    suffixes: tuple[str, ...]
    module: str
    holds_model: bool
    sharded: bool = False
    keras_layout: bool = True

    @property
    def impl(self) -> ModuleType:
        return importlib.import_module(f"fastckpt.formats.{self.module}")

    def plan(self, request: SaveRequest) -> list[_fastckpt.PlannedFile]:
        """The files of one save; see the package's documentation."""
        if self.sharded and request.max_shard_size is None:
            raise ValueError(
                "Saving sharded weights (a `.weights.json` index) needs `max_shard_size` "
                f"(in GB). Received: path={request.path!r}"
            )
        if not self.sharded and request.max_shard_size is not None:
            raise ValueError(
                "`max_shard_size` needs a path ending in `.weights.json` (the shards' "
                f"index). Received: path={request.path!r}"
            )
        if request.extra is not None and self.name != "weights_h5":
            raise ValueError(f"only .weights.h5 files carry fastckpt's extras, not {self.name}")
        files: list[_fastckpt.PlannedFile] = self.impl.plan(request)
        return files

    def ready(self, model: Any, plan: SavePlan) -> None:
        """Finds out, ahead of the first save of `plan` (off the training thread), what
        that save would otherwise find out in its hook: the module's `ready`, where it has
        one (a `.keras` file: whether any object saves assets)."""
        ready = getattr(self.impl, "ready", None)
        if ready is not None:
            ready(model, plan)

    def open(self, path: str) -> Checkpoint:
        """The file opened for reading (see `open_checkpoint`)."""
        checkpoint: Checkpoint = self.impl.open(path)
        return checkpoint

    def extras(self, path: str) -> Groups:
        """What a conversion carries over besides the tensors (Keras layout only)."""
        with content_errors(path):
            groups: Groups = self.impl.extras(path)
        return groups

    def plan_contents(self, contents: Contents) -> list[_fastckpt.PlannedFile]:
        """The files holding `contents` in this format (Keras layout only)."""
        if self.sharded and contents.max_shard_size is None:
            raise ValueError(
                "Writing sharded weights (a `.weights.json` index) needs `max_shard_size` "
                f"(in GB). Received: path={contents.path!r}"
            )
        files: list[_fastckpt.PlannedFile] = self.impl.plan_contents(contents)
        return files


# Longest suffixes first: "x.weights.h5" is a weights file, "x.h5" a legacy full model.
FORMATS: tuple[Format, ...] = (
    Format("weights_h5", (".weights.h5",), "weights_h5", holds_model=False),
    Format("weights_sharded", (".weights.json",), "sharded", holds_model=False, sharded=True),
    Format("safetensors_zstd", (".zst.safetensors",), "zstd_safetensors", holds_model=True),
    Format("safetensors", (".safetensors",), "safetensors", holds_model=True),
    Format("keras", (".keras",), "keras_zip", holds_model=True),
    Format("legacy_h5", (".h5", ".hdf5"), "legacy_h5", holds_model=True, keras_layout=False),
    Format("process_shards", (".shards.json",), "process_shards", holds_model=False),
)

_BY_NAME = {f.name: f for f in FORMATS}
SUFFIXES = [s for f in FORMATS for s in f.suffixes]


def by_name(name: str) -> Format:
    """The format `save(format=name)` asks for; ValueError listing the names otherwise."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"Unknown format {name!r}; expected one of {sorted(_BY_NAME)}") from None


def format_for(path: str | os.PathLike[str]) -> Format:
    """The format a file name asks for; ValueError listing the suffixes otherwise."""
    name = os.fspath(path)
    for fmt in FORMATS:
        if name.endswith(fmt.suffixes):
            return fmt
    raise ValueError(
        f"fastckpt cannot tell the checkpoint format from the file name: it must end in "
        f"one of {', '.join(SUFFIXES)}. Received: path={name!r}"
    )


def with_compression(fmt: Format, compression: str | None, path: str) -> Format:
    """The format a save writes with `compression`: `"zstd"` turns a `.safetensors` save
    into the zstd container (which `.zst.safetensors` names already); other formats have
    no compressed form (Keras's readers would not read one)."""
    if compression is None:
        return fmt
    if compression != "zstd":
        raise ValueError(
            f"Unknown compression {compression!r}: fastckpt knows 'zstd'. "
            f"Received: compression={compression!r}"
        )
    if fmt.name not in ("safetensors", "safetensors_zstd"):
        raise ValueError(
            "compression='zstd' writes the zstd container, a `.safetensors`-style file: "
            "name it `.zst.safetensors` (Keras's own formats have no compressed form). "
            f"Received: path={path!r}"
        )
    return _BY_NAME["safetensors_zstd"]


def for_model_checkpoint(filepath: str, weights_only: bool) -> Format:
    """The format `ModelCheckpoint` writes: Keras's rule (`model.save` writes the legacy
    format for any `.h5` name, `x.weights.h5` included, when not weights-only), plus
    `.safetensors` and `.zst.safetensors`."""
    if filepath.endswith(".zst.safetensors"):
        return _BY_NAME["safetensors_zstd"]
    if filepath.endswith(".shards.json"):
        return _BY_NAME["process_shards"]
    if filepath.endswith(".safetensors"):
        return _BY_NAME["safetensors"]
    if weights_only:
        return _BY_NAME["weights_h5"]
    if filepath.endswith(".keras"):
        return _BY_NAME["keras"]
    return _BY_NAME["legacy_h5"]


def check_local(path: str, argument: str = "path", hint: str = "") -> None:
    """Refuses remote paths (`gs://...`): fastckpt writes local files only. The message
    names `argument` (as Keras's messages do) and adds `hint`."""
    if "://" in path:
        raise ValueError(f"fastckpt writes local files only{hint}. Received: {argument}={path!r}")


def check_target(path: str | os.PathLike[str], overwrite: bool = True) -> str:
    """Where a save may write: a local path, and with `overwrite=False` not an existing
    file. (That it is no folder, and its folder exists, the writer checks as it writes.)
    Returns the path as a string."""
    path = os.fspath(path)
    check_local(path)
    if not overwrite and os.path.exists(path):
        raise FileExistsError(errno.EEXIST, "checkpoint exists and overwrite=False", path)
    return path


def open_checkpoint(path: str | os.PathLike[str], *, legacy: bool = False) -> Checkpoint:
    """Opens a checkpoint in the Keras weights layout (`.safetensors`, `.weights.h5`,
    `.weights.json`, `.keras`), by suffix; with `legacy`, also a legacy full-model `.h5`
    (whose layout `load` hands to Keras's legacy loader).

    Raises:
        CheckpointContentError: the file is damaged, hostile or not a checkpoint.
        CheckpointNotFoundError: there is no file at `path` (a FileNotFoundError and a
            ValueError).
        OSError: the file cannot be read (PermissionError, ...).
    """
    path = os.fspath(path)
    fmt = format_for(path)
    if not fmt.keras_layout and not legacy:
        raise ValueError(f"{path} is a legacy full-model HDF5 file: it has no Keras weights tree")
    try:
        os.stat(path)  # a missing or unreadable file is an OSError, not a content error
    except FileNotFoundError:
        raise CheckpointNotFoundError(errno.ENOENT, "No such file or directory", path) from None
    with content_errors(path):
        return fmt.open(path)
