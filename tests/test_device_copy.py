"""The native device-to-host copy (`_fastckpt.copy_from_dlpack`) and host pinning
(`_fastckpt.pin_host`) that snapshots of GPU-resident JAX and TensorFlow variables use.

No test machine has a GPU: what runs here is the DLPack reading (capsules of numpy and of
the backend under test, both DLPack versions, what must be refused) through the host
branch of the copy, and the absence of a driver; the CUDA branch runs against a stand-in
for the driver in `tests/test_cuda_driver.py`, and on a GPU in `benches/gpu_snapshot.py`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import BACKEND
from fastckpt import _fastckpt


class _Consumed:
    """Hands numpy a capsule, which it consumes (renames to "used_dltensor")."""

    def __init__(self, capsule):
        self.capsule = capsule

    def __dlpack__(self, *args, **kwargs):
        return self.capsule

    def __dlpack_device__(self):
        return (1, 0)


def test_numpy_capsules_of_both_versions_are_copied_byte_for_byte():
    rng = np.random.default_rng(0)
    sources = [
        rng.normal(size=(64, 33)).astype("float32"),
        np.arange(7, dtype="int64"),
        np.array(3.5, "float64"),  # 0-d
        np.zeros((0, 4), "float32"),  # empty
        rng.integers(0, 2, size=(5,)).astype(bool),
    ]
    for version in (None, (1, 0)):
        capsules = [
            s.__dlpack__(max_version=version) if version else s.__dlpack__() for s in sources
        ]
        dests = [np.empty_like(s) for s in sources]
        _fastckpt.copy_from_dlpack(list(zip(capsules, dests, strict=True)), threads=2)
        for s, d in zip(sources, dests, strict=True):
            assert d.tobytes() == s.tobytes()


def backend_tensor(values: np.ndarray):
    """A tensor of the backend under test holding `values`, and its DLPack capsule."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        tensor = tf.constant(values)
        return tensor, tf.experimental.dlpack.to_dlpack(tensor)
    if BACKEND == "jax":
        import jax.numpy as jnp

        tensor = jnp.asarray(values)
        return tensor, tensor.__dlpack__()
    import torch

    tensor = torch.from_numpy(values.copy())
    return tensor, tensor.__dlpack__()


def test_a_capsule_of_the_backend_under_test_is_copied():
    values = np.random.default_rng(1).normal(size=(300, 17)).astype("float32")
    tensor, capsule = backend_tensor(values)
    dest = np.empty_like(values)
    _fastckpt.copy_from_dlpack([(capsule, dest)])
    assert dest.tobytes() == values.tobytes()
    del tensor


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (
            lambda: (np.ones((4, 4), "float32").T.__dlpack__(), np.empty((4, 4), "float32")),
            "not dense and row-major",
        ),
        (
            lambda: (np.ones(4, "float32").__dlpack__(), np.empty(5, "float32")),
            "the source has 16 bytes, the destination 20",
        ),
        (lambda: ("not a capsule", np.empty(1)), "must be a DLPack capsule"),
        (
            lambda: (np.ones(4, "float32").__dlpack__(), np.ones(4, "float32")[::2]),
            "must be a writable C-contiguous array",
        ),
    ],
    ids=["strided", "size", "not_a_capsule", "strided_destination"],
)
def test_what_cannot_be_copied_exactly_is_refused(make, words):
    capsule, dest = make()
    with pytest.raises((ValueError, TypeError), match=words):
        _fastckpt.copy_from_dlpack([(capsule, dest)])


def test_a_consumed_capsule_is_refused():
    capsule = np.ones(3, "float32").__dlpack__()
    np.from_dlpack(_Consumed(capsule))  # numpy takes the tensor and renames the capsule
    with pytest.raises(ValueError, match="not an unconsumed DLPack capsule"):
        _fastckpt.copy_from_dlpack([(capsule, np.empty(3, "float32"))])


def test_pinning_needs_the_cuda_driver():
    block = np.zeros(1 << 16, np.uint8)
    pinned = _fastckpt.pin_host(block)
    assert (pinned is None) == (not _fastckpt.cuda_available())


def test_a_cuda_tensor_without_a_driver_is_an_error_not_a_crash(tmp_path):
    """A capsule claiming CUDA memory, with the driver turned off: a RuntimeError naming
    the driver, before any byte is read."""
    script = textwrap.dedent(
        """
        import ctypes, numpy as np
        from fastckpt import _fastckpt

        class Device(ctypes.Structure):
            _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]
        class DType(ctypes.Structure):
            _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8),
                        ("lanes", ctypes.c_uint16)]
        class Tensor(ctypes.Structure):
            _fields_ = [("data", ctypes.c_void_p), ("device", Device), ("ndim", ctypes.c_int32),
                        ("dtype", DType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                        ("strides", ctypes.c_void_p), ("byte_offset", ctypes.c_uint64)]
        class Managed(ctypes.Structure):
            _fields_ = [("dl_tensor", Tensor), ("manager_ctx", ctypes.c_void_p),
                        ("deleter", ctypes.c_void_p)]
        shape = (ctypes.c_int64 * 1)(4)
        managed = Managed(Tensor(0xDEAD0000, Device(2, 0), 1, DType(2, 32, 1), shape, None, 0))
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        capsule = new(ctypes.addressof(managed), b"dltensor", None)
        try:
            _fastckpt.copy_from_dlpack([(capsule, np.empty(4, "float32"))])
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "FASTCKPT_CUDA": "0"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "refused: a tensor is on a CUDA device, but the CUDA driver" in done.stdout
