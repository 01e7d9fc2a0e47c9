"""The native module: the whole boundary between Python and the Rust core."""

import os
from collections.abc import Sequence

import numpy as np
from typing_extensions import final

DEFAULT_THREADS: int
DEFAULT_BACKGROUND_THREADS: int
FAULT_INJECTION: bool
DTYPES: dict[str, int]

@final
class Job:
    def wait(self, timeout: float | None = None) -> bool: ...
    def done(self) -> bool: ...
    def result(self) -> tuple[list[str], int, float]: ...
    def exception(self) -> BaseException | None: ...

def write_safetensors(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    metadata: dict[str, str],
    *,
    threads: int | None = None,
    background: bool = False,
) -> Job: ...

_Attr = tuple[str, str, object]
_Node = tuple[str, int | None, Sequence[_Attr]]

def write_hdf5(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    nodes: Sequence[_Node],
    *,
    threads: int | None = None,
    background: bool = False,
) -> Job: ...
def write_keras(
    path: str | os.PathLike[str],
    tensors: Sequence[tuple[str, np.ndarray]],
    nodes: Sequence[_Node],
    before: Sequence[tuple[str, bytes]],
    after: Sequence[tuple[str, bytes]],
    *,
    weights_name: str = "model.weights.h5",
    threads: int | None = None,
    background: bool = False,
) -> Job: ...
def write_bytes(path: str | os.PathLike[str], data: bytes, *, background: bool = False) -> Job: ...
def read_into(
    path: str | os.PathLike[str],
    items: Sequence[tuple[int, np.ndarray]],
    *,
    threads: int | None = None,
    crc32c: bool = False,
) -> list[int] | None: ...
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
