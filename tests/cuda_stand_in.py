"""The CUDA driver stand-in (`tests/fake_cuda/fake_cuda.c`): built once per test session,
loaded as `libcuda.so.1` by child processes through `LD_LIBRARY_PATH`, with forged DLPack
capsules of CUDA tensors over host memory the stand-in treats as device memory.

Imported both by the tests (`build`, `run_child`) and by the child scripts they run
(`load`, `cuda_capsule`, `log_lines`).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import numpy as np

from child_script import run_script

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "fake_cuda", "fake_cuda.c")
KDL_CUDA = 2


def build(folder: str) -> str:
    """Compiles the stand-in into `folder/libcuda.so.1`; returns the folder."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler, "a C compiler (cc) is needed to build the CUDA driver stand-in"
    out = os.path.join(folder, "libcuda.so.1")
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-Wall", "-o", out, SOURCE, "-lpthread"],
        check=True,
        capture_output=True,
        text=True,
    )
    return folder


def run_child(library_folder: str, script: str, *, devices: int = 2) -> str:
    """Runs `script` in a fresh interpreter that loads the stand-in as its CUDA driver;
    returns its stdout, failing with its output if it exits non-zero."""
    paths = [library_folder, os.environ.get("LD_LIBRARY_PATH", "")]
    return run_script(
        script,
        what="a child with the CUDA driver stand-in",
        timeout=300,
        LD_LIBRARY_PATH=os.pathsep.join(p for p in paths if p),
        FAKE_CUDA_DEVICES=str(devices),
        FASTCKPT_CUDA="1",
    )


# In the child --------------------------------------------------------------------------


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _Device),
        ("ndim", ctypes.c_int32),
        ("dtype", _DType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


class _Managed(ctypes.Structure):
    _fields_ = [
        ("dl_tensor", _Tensor),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
    ]


# The structs a forged capsule points into, kept for the life of the child.
_kept: list[object] = []


def load() -> ctypes.CDLL:
    """The stand-in the process loaded as its driver (the same library: dlopen counts)."""
    lib = ctypes.CDLL("libcuda.so.1")
    lib.fake_log.restype = ctypes.c_char_p
    lib.fake_device_memory.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    lib.fake_queue_write.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_ubyte, ctypes.c_size_t]
    lib.fake_fail_copies_from.argtypes = [ctypes.c_uint64]
    return lib


def address(array: np.ndarray) -> int:
    return int(array.__array_interface__["data"][0])


def cuda_capsule(array: np.ndarray, device: int, lib: ctypes.CDLL | None = None) -> object:
    """A "dltensor" capsule saying `array`'s bytes are a tensor on CUDA device `device`;
    with `lib`, the stand-in is told they are that device's memory."""
    assert array.flags.c_contiguous
    if lib is not None:
        lib.fake_device_memory(device, address(array), array.nbytes)
    code = {"f": 2, "i": 0, "u": 1, "b": 6}[array.dtype.kind]
    shape = (ctypes.c_int64 * max(array.ndim, 1))(*array.shape)
    managed = _Managed(
        _Tensor(
            address(array),
            _Device(KDL_CUDA, device),
            array.ndim,
            _DType(code, array.dtype.itemsize * 8, 1),
            shape,
            None,
            0,
        )
    )
    _kept.extend([shape, managed, array])
    new = ctypes.pythonapi.PyCapsule_New
    new.restype = ctypes.py_object
    new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(managed), b"dltensor", None)


def log_lines(lib: ctypes.CDLL) -> list[str]:
    return [line for line in lib.fake_log().decode().splitlines() if line]
