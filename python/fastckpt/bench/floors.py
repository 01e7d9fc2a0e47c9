"""The physical floors every contender is compared with, measured in the same run.

- snapshot floor: one memcpy of the checkpoint's state into host memory already touched
  (what the training thread cannot avoid if it copies at all);
- write floor: one thread `write`s the same number of bytes from host memory to a temp file
  beside the target, `fsync`s it, renames it over the target and fsyncs the folder: the
  durability every fastckpt save provides, with no format and no parallelism;
- `dd conv=fsync`: the same write through coreutils, as a cross-check of the write floor;
- read floor: one thread reads a checkpoint file into host memory already touched.
"""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import time
from typing import Any

import keras
import numpy as np

CHUNK = 8 << 20


def touched(nbytes: int) -> np.ndarray:
    """A byte buffer whose pages are already faulted in (fresh memory costs 5x more here)."""
    buf = np.empty(max(nbytes, 1), np.uint8)
    buf.fill(1)
    return buf


def state_views(model: Any, include_optimizer: bool = True) -> list[np.ndarray]:
    """The bytes of every variable a checkpoint holds, as host arrays: on TensorFlow (CPU),
    zero-copy views of the variables' own buffers; elsewhere one host copy each."""
    variables = list(model.variables)
    if include_optimizer and getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    out = []
    for v in variables:
        view = None
        if keras.backend.backend() == "tensorflow":
            from fastckpt._keras_private import tf_read_variable_op
            from fastckpt._readers import _host_view

            tf_var = v.value
            try:
                tensor = tf_read_variable_op()(tf_var.handle, tf_var.dtype)
                view = _host_view(tensor).reshape(tuple(v.shape))
            except (AttributeError, TypeError, ValueError):
                view = None
        out.append(view if view is not None else np.array(v.numpy(), copy=True))
    return out


class SnapshotFloor:
    """Copies the state's arrays into host memory that was allocated and touched once (by
    default a slice of `dest`, e.g. the write floor's buffer, so the floor costs no extra
    memory): the least any snapshot on the training thread can cost."""

    def __init__(self, sources: list[np.ndarray], dest: np.ndarray | None = None) -> None:
        self.sources = sources
        self.nbytes = sum(a.nbytes for a in sources)
        if dest is None:
            dest = touched(self.nbytes)
        flat = dest.view(np.uint8).reshape(-1)
        self.dest = []
        at = 0
        for a in sources:
            self.dest.append(flat[at : at + a.nbytes].view(a.dtype).reshape(a.shape))
            at += a.nbytes

    def __call__(self) -> float:
        start = time.perf_counter()
        for src, dst in zip(self.sources, self.dest, strict=True):
            np.copyto(dst, src, casting="no")
        return time.perf_counter() - start


def remove_if_exists(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_durable(path: str) -> None:
    """fsyncs a file another library wrote (none of Keras, h5py or safetensors does) and its
    folder, so every contender is timed to the same durability."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    fsync_folder(os.path.dirname(os.path.abspath(path)))


def write_floor(buf: np.ndarray, path: str) -> float:
    """Seconds for one thread to write `buf` durably to `path` (temp file, fsync, rename,
    folder fsync), as fastckpt does."""
    view = buf.data.cast("B")
    folder = os.path.dirname(os.path.abspath(path))
    temp = f"{path}.floor-tmp"
    start = time.perf_counter()
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        done = 0
        while done < len(view):
            done += os.write(fd, view[done : done + CHUNK])
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, path)
    fsync_folder(folder)
    return time.perf_counter() - start


def dd_available() -> bool:
    return shutil.which("dd") is not None


def dd_floor(nbytes: int, path: str) -> float:
    """Seconds for `dd if=/dev/zero bs=1M conv=fsync` to write `nbytes` (rounded up to 1 MiB),
    process start included (a few ms)."""
    mib = max(1, -(-nbytes // (1 << 20)))
    cmd = ["dd", "if=/dev/zero", f"of={path}", "bs=1M", f"count={mib}", "conv=fsync"]
    start = time.perf_counter()
    subprocess.run([*cmd, "status=none"], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def read_floor(path: str, buf: np.ndarray) -> float:
    """Seconds for one thread to read all of `path` into `buf` (at least the file's size)."""
    view = buf.data.cast("B")
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        done = 0
        while True:
            got = f.readinto(view[done : done + CHUNK])
            if not got:
                break
            done += got
    return time.perf_counter() - start


def read_floor_parallel(
    path: str,
    buf: np.ndarray,
    threads: int | None = None,
    *,
    piece: int = CHUNK,
    direct: bool = False,
) -> float:
    """Seconds for `threads` threads (default: one per core) to read all of `path` into
    `buf`, taking `piece`-byte pieces in file order (so the device sees one stream read
    ahead, which it serves faster than distant shares): what the device gives when nothing
    else is done with the bytes. With `direct`, through `O_DIRECT` (no page cache): `buf`
    must then start on a page and hold the file's size rounded up to a page, and `piece`
    be a multiple of a page."""
    import concurrent.futures
    import itertools

    size = os.path.getsize(path)
    view = buf.data.cast("B")
    page = mmap.PAGESIZE
    need = -(-size // page) * page if direct else size
    if len(view) < need:
        raise ValueError(f"read_floor_parallel: a {len(view)}-byte buffer for {need} bytes")
    if direct and (buf.ctypes.data % page or piece % page):
        raise ValueError("read_floor_parallel: direct reads need page-aligned memory and pieces")
    pieces = itertools.count(0, piece)  # next() is atomic under the GIL
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))

    def read() -> None:
        for at in pieces:
            if at >= size:
                return
            # A direct read asks for whole pages; at the file's end it returns what is there.
            end = min(need, at + piece)
            while at < min(end, size):
                got = os.preadv(fd, [view[at:end]], at)
                if not got:
                    return
                at += got

    try:
        start = time.perf_counter()
        count = max(1, threads or os.cpu_count() or 1)
        with concurrent.futures.ThreadPoolExecutor(count) as pool:
            for done in [pool.submit(read) for _ in range(count)]:
                done.result()
        return time.perf_counter() - start
    finally:
        os.close(fd)


def drop_from_page_cache(path: str) -> None:
    """Asks the kernel to evict `path`'s clean pages (posix_fadvise DONTNEED), so the next
    read comes from the device. Only this file is affected; on tmpfs it does nothing."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
