"""The native module: the whole boundary between Python and the Rust core."""

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from typing_extensions import final

DEFAULT_THREADS: int
DEFAULT_BACKGROUND_THREADS: int
FAULT_INJECTION: bool
DTYPES: dict[str, int]

@final
class WriteReport:
    @property
    def paths(self) -> list[Path]: ...
    @property
    def bytes(self) -> int: ...
    @property
    def seconds(self) -> float: ...
    @property
    def kept(self) -> Path | None: ...

@final
class Job:
    def wait(self, timeout: float | None = None) -> bool: ...
    def done(self) -> bool: ...
    def begun(self) -> bool: ...
    def cancel(self) -> bool: ...
    def hurry(self) -> None: ...
    def result(self) -> WriteReport: ...
    def exception(self) -> BaseException | None: ...

@final
class WriteOptions:
    def __new__(
        cls,
        *,
        threads: int | None = None,
        background: bool = False,
        queue_after: Job | None = None,
        reuse: str | os.PathLike[str] | None = None,
        keep_replaced: bool = False,
        direct_io: bool = True,
    ) -> WriteOptions: ...
    @property
    def threads(self) -> int | None: ...
    @property
    def background(self) -> bool: ...
    @property
    def queue_after(self) -> Job | None: ...
    @property
    def reuse(self) -> Path | None: ...
    @property
    def keep_replaced(self) -> bool: ...
    @property
    def direct_io(self) -> bool: ...

def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    metadata: dict[str, str],
    *,
    options: WriteOptions | None = None,
) -> Job: ...

_Attr = tuple[str, str, object]
_Node = tuple[str, int | None, Sequence[_Attr]]

def write_hdf5(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    nodes: Sequence[_Node],
    *,
    options: WriteOptions | None = None,
) -> Job: ...
def write_keras(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    nodes: Sequence[_Node],
    before: Sequence[tuple[str, bytes]],
    after: Sequence[tuple[str, bytes]],
    *,
    weights_name: str = "model.weights.h5",
    options: WriteOptions | None = None,
) -> Job: ...
def write_bytes(
    path: str | os.PathLike[str], data: bytes, *, options: WriteOptions | None = None
) -> Job: ...
def read_into(
    path: str | os.PathLike[str],
    items: Sequence[tuple[int, np.ndarray]],
    *,
    threads: int | None = None,
    crc32c: bool = False,
) -> list[int] | None: ...
def copy_into(
    pairs: Sequence[tuple[np.ndarray, np.ndarray]], *, threads: int | None = None
) -> None: ...
def prefault(buffer: np.ndarray) -> Job: ...
def reserve_spare(target: str | os.PathLike[str], length: int) -> Job: ...
def crc32_of_range(
    path: str | os.PathLike[str], offset: int, length: int, *, threads: int | None = None
) -> int: ...
def safetensors_header(
    path: str | os.PathLike[str],
) -> tuple[dict[str, str], list[tuple[str, str, list[int], int, int, int | None]]]: ...
def sweep_stale_temps(folder: str | os.PathLike[str]) -> int: ...
def is_temp_name(name: str | os.PathLike[str]) -> bool: ...
def _inject_fault(stage: str | None) -> None: ...
def _inject_delay(ms: int) -> None: ...
