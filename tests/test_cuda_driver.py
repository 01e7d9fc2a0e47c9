"""The CUDA branch of the snapshot copy (`rust/core/src/cuda.rs`, `_fastckpt.copy_from_dlpack`
and `_fastckpt.pin_host`) against a stand-in for the driver (`tests/fake_cuda/fake_cuda.c`).

No test machine has a GPU. The stand-in keeps what a snapshot's correctness rests on: a
training step's writes land only when the device is synchronised, and a queued copy
lands only when its stream is. So a copy that skipped the device wait would read the
previous step's bytes, and one not waited for would leave its destination unwritten. It
refuses a copy queued in another device's context and logs every call, which shows the
order: one device wait, every copy queued, one stream wait, per device.
"""

from __future__ import annotations

import textwrap

import pytest

import cuda_stand_in


@pytest.fixture(scope="session")
def stand_in(tmp_path_factory: pytest.TempPathFactory) -> str:
    return cuda_stand_in.build(str(tmp_path_factory.mktemp("fake-cuda")))


PRELUDE = """
import numpy as np
from fastckpt import _fastckpt
from cuda_stand_in import address, cuda_capsule, load, log_lines

lib = load()
assert _fastckpt.cuda_available(), "the stand-in was not loaded as the driver"
"""


def child(stand_in: str, body: str) -> str:
    """Runs `body` after the prelude in a child whose CUDA driver is the stand-in."""
    return cuda_stand_in.run_child(stand_in, PRELUDE + textwrap.dedent(body))


def batch(calls: list[str]) -> list[str]:
    """The logged calls of a batched copy: device waits, copies, stream waits."""
    return [line for line in calls if line.startswith(("sync", "copy", "wait"))]


def test_the_stand_in_is_the_driver_and_is_found(stand_in):
    out = child(stand_in, "print(log_lines(lib))")
    assert "cuInit" in out


def test_no_device_is_no_driver(stand_in):
    """`cuInit` failing (no device) leaves fastckpt on its host paths."""
    script = """
    from fastckpt import _fastckpt
    import numpy as np
    print(_fastckpt.cuda_available(), _fastckpt.pin_host(np.zeros(4096, np.uint8)))
    """
    assert cuda_stand_in.run_child(stand_in, script, devices=0).split() == ["False", "None"]


def test_a_batch_from_two_devices_holds_what_the_step_wrote(stand_in):
    """The last step's writes are still queued on each device when the snapshot starts: it
    must wait for them, queue every copy, then wait for the copies, once per device."""
    body = """
    rng = np.random.default_rng(0)
    on0 = [rng.normal(size=(64, 33)).astype("float32"), np.arange(5, dtype="int64"),
           np.zeros((0, 3), "float32")]
    on1 = [rng.normal(size=(17,)).astype("float64")]
    capsules = [cuda_capsule(a, 0, lib) for a in on0] + [cuda_capsule(a, 1, lib)
                                                         for a in on1]
    # The step still running: it will write 7s into the first tensor, 9s into device 1's.
    lib.fake_queue_write(0, address(on0[0]), 7, on0[0].nbytes)
    lib.fake_queue_write(1, address(on1[0]), 9, on1[0].nbytes)
    dests = [np.full_like(a, 1) for a in on0 + on1]
    _fastckpt.copy_from_dlpack(list(zip(capsules, dests)))
    for src, dst in zip(on0 + on1, dests):
        assert dst.tobytes() == src.tobytes(), "a copy holds other bytes than the device's"
    assert set(dests[0].view(np.uint8).ravel()) == {7}
    assert set(dests[3].view(np.uint8).ravel()) == {9}
    assert lib.fake_depth() == 0, "a pushed context was left current"
    first = log_lines(lib)
    # A second snapshot reuses the contexts and streams.
    lib.fake_queue_write(0, address(on0[1]), 3, on0[1].nbytes)
    _fastckpt.copy_from_dlpack(list(zip(capsules, dests)))
    assert set(dests[1].view(np.uint8).ravel()) == {3}
    print("\\n".join(first))
    print("--")
    print("\\n".join(log_lines(lib)[len(first):]))
    """
    first, second = (part.strip().splitlines() for part in child(stand_in, body).split("--"))
    assert batch(first) == [
        "sync device 0",
        "copy device 0 8448 bytes queued -> pageable",
        "copy device 0 40 bytes queued -> pageable",
        "sync device 1",
        "copy device 1 136 bytes queued -> pageable",
        "wait device 0: 2 copies",
        "wait device 1: 1 copies",
    ], first
    # A non-blocking stream per device, made once.
    assert [line for line in first if line.startswith("stream")] == [
        "stream device 0 flags 1",
        "stream device 1 flags 1",
    ]
    assert not [line for line in second if line.startswith(("stream", "retain"))], second


def test_pinned_memory_is_registered_once_and_released(stand_in):
    """`pin_host` registers the block (for every context) until the object is dropped, and
    copies into views of it land in pinned memory."""
    body = """
    block = np.zeros(3 << 12, np.uint8)
    pinned = _fastckpt.pin_host(block)
    assert pinned is not None
    src = np.arange(1000, dtype="float32")
    dest = block[4096:8096].view("float32")
    _fastckpt.copy_from_dlpack([(cuda_capsule(src, 0, lib), dest)])
    assert dest.tobytes() == src.tobytes()
    assert _fastckpt.pin_host(np.zeros(0, np.uint8)) is None
    del pinned
    print("\\n".join(log_lines(lib)))
    """
    lines = child(stand_in, body).splitlines()
    picked = [line for line in lines if line.startswith(("register", "copy", "unregister"))]
    assert picked == [
        "register 12288 bytes flags 1",
        "copy device 0 4000 bytes queued -> pinned",
        "unregister 12288 bytes",
    ], lines


def test_a_failed_copy_is_an_error_and_nothing_runs_after_it(stand_in):
    """A copy the driver refuses is an error naming the call and the driver's error; the
    copies queued before it are waited for before the call returns (the caller reuses
    the buffers), and no context is left pushed."""
    body = """
    srcs = [np.arange(10, dtype="float32"), np.arange(20, dtype="float32")]
    caps = [cuda_capsule(s, 0, lib) for s in srcs]
    lib.fake_fail_copies_from(address(srcs[1]))
    dests = [np.zeros_like(s) for s in srcs]
    try:
        _fastckpt.copy_from_dlpack(list(zip(caps, dests)))
    except Exception as e:
        print(type(e).__name__, e)
    assert lib.fake_depth() == 0
    print("\\n".join(log_lines(lib)))
    """
    out = child(stand_in, body).splitlines()
    assert out[0] == (
        "CheckpointError the CUDA driver's cuMemcpyDtoHAsync failed: "
        "CUDA_ERROR_ILLEGAL_ADDRESS (700)"
    ), out
    assert batch(out) == [
        "sync device 0",
        "copy device 0 40 bytes queued -> pageable",
        "copy device 0 80 bytes refused -> pageable",
        "wait device 0: 1 copies",
    ], out


def test_a_device_the_driver_does_not_have_is_an_error(stand_in):
    body = """
    src = np.arange(4, dtype="float32")
    try:
        _fastckpt.copy_from_dlpack([(cuda_capsule(src, 3), np.zeros(4, "float32"))])
    except Exception as e:
        print(type(e).__name__, e)
    """
    out = child(stand_in, body).strip()
    assert out == (
        "CheckpointError the CUDA driver's cuDeviceGet failed: CUDA_ERROR_INVALID_DEVICE (101)"
    )


@pytest.mark.backends(
    "tensorflow",
    "jax",
    reason="TensorFlow's and JAX's GPU snapshots go through the CUDA driver; torch's through "
    "torch's own copies into pinned memory",
)
@pytest.mark.parametrize("background", [False, True], ids=["sync", "background"])
def test_a_model_on_a_gpu_is_saved_through_the_driver(stand_in, tmp_path, background):
    """The backend's reader, told its variables are on GPU 0 (their capsules forged as CUDA
    ones over their host bytes), saves every value, however small, through the pinned
    arena in one batch, pinned once for both saves; each file equals Keras's own of the same
    model at the same step."""
    body = f"""
    import os
    import subprocess
    import keras
    import fastckpt
    from fastckpt import _snapshot

    BACKEND = keras.backend.backend()

    class OnGpu:
        # A value the reader sees on GPU 0: its DLPack capsule says so; its bytes are
        # host memory the stand-in treats as the device's.
        def __init__(self, value):
            self.value = value
        def __dlpack__(self, *args, **kwargs):
            return cuda_capsule(np.ascontiguousarray(np.asarray(self.value)), 0, lib)

    class Variable:
        def __init__(self, variable):
            self.variable = variable
        @property
        def value(self):
            return OnGpu(self.variable.value)

    made = _snapshot.reader_for
    def reader_on_gpu(plan, values=None):
        reader = made(plan, values)
        reader.on_device = True
        reader._cuda = True
        if BACKEND == "jax":
            reader._variables = [Variable(v) for v in reader._variables]
        return reader
    _snapshot.reader_for = reader_on_gpu
    if BACKEND == "tensorflow":
        import tensorflow as tf
        tf.experimental.dlpack.to_dlpack = lambda t: OnGpu(t).__dlpack__()

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(300),
                              keras.layers.Dense(3)])
    model.compile("adam", "mse")
    x, y = np.ones((8, 6), "float32"), np.ones((8, 3), "float32")
    for step in range(2):
        model.fit(x, y, epochs=1, verbose=0)
        before = len(log_lines(lib))
        ours = os.path.join({str(tmp_path)!r}, f"ours-{{step}}.weights.h5")
        theirs = os.path.join({str(tmp_path)!r}, f"keras-{{step}}.weights.h5")
        job = fastckpt.save(model, ours, background={background})
        if {background}:
            job.result()
        model.save_weights(theirs)
        diff = subprocess.run(["h5diff", "-c", theirs, ours], capture_output=True, text=True)
        assert diff.returncode == 0 and not diff.stdout, diff.stdout + diff.stderr
        print("save", step, "|".join(log_lines(lib)[before:]))
    print("variables", len(model.weights) + len(model.optimizer.variables))
    """
    out = child(stand_in, body).splitlines()
    saves = [line.split(" ", 2)[2].split("|") for line in out if line.startswith("save ")]
    count = int(next(line for line in out if line.startswith("variables")).split()[1])
    assert len(saves) == 2, out
    for i, calls in enumerate(saves):
        copies = [c for c in calls if c.startswith("copy")]
        registers = [c for c in calls if c.startswith("register")]
        # Pinned once, when the arena is made for the first save; reused by the second.
        assert len(registers) == (1 if i == 0 else 0), calls
        assert len(copies) == count, calls
        assert all(c.endswith("queued -> pinned") for c in copies), calls
        queued = batch(calls)
        assert queued[0] == "sync device 0" and queued[-1] == f"wait device 0: {count} copies"
        assert len(queued) == count + 2, calls
