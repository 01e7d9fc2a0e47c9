"""Under the backend under test (`KERAS_BACKEND`: `make test` runs this file under
TensorFlow, JAX and torch), fastckpt's files hold what Keras's own files of the same model
hold, load back bit for bit, and a background snapshot holds the values of its step.

The model holds the variables whose dtypes the backends disagree on: a float64 one (float32
values under JAX with x64 off, its default), an integer counter (int64 under TensorFlow,
int32 under JAX; non-trainable, as torch requires of integers), a bfloat16 one, and Adam's
iteration count (Keras's "int": int64 under TensorFlow, int32 elsewhere). The oracles are
Keras's `save_weights`, `load_weights`, `save` and `load_model` on the same backend, h5py,
`h5diff` and the `safetensors` package.
"""

from __future__ import annotations

import subprocess
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

import fastckpt
from backend_models import assert_same_held_state, bag_model
from conftest import BACKEND
from fastckpt import _readers, _snapshot, _walk
from fastckpt._fastckpt import testing

# Keras under JAX (x64 off) warns each time it makes or casts to the float64
# and int64 the model holds on purpose.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Explicitly requested dtype (float|int)64:UserWarning"
)

READERS = {"tensorflow": "_TensorFlowReader", "jax": "_JaxReader", "torch": "_TorchReader"}


def datasets(path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}

    def keep(name: str, item: object) -> None:
        # visititems stops at the first call that returns anything but None.
        if isinstance(item, h5py.Dataset):
            value = item[()]
            # Keras stores bfloat16 as 2-byte opaque data tagged with a "dtype" attribute.
            if item.attrs.get("dtype") == "bfloat16":
                value = value.view(ml_dtypes.bfloat16)
            out[name] = value

    with h5py.File(path, "r") as f:
        f.visititems(keep)
    return out


def assert_same_arrays(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert x.tobytes() == y.tobytes(), name


def test_the_snapshot_reads_through_the_backends_own_reader():
    plan = _walk.plan_for(bag_model(0))
    reader = _snapshot.snapshotter_for(plan)._read
    assert type(reader).__name__ == READERS[BACKEND]


def test_weights_h5_is_keras_own_file_and_round_trips(tmp_path):
    """The issue's case: under JAX a float64 variable holds float32 values; fastckpt saves
    them as Keras does and loads its own file (and Keras's) back, bit for bit."""
    model = bag_model(0)
    ours, theirs = tmp_path / "ours.weights.h5", tmp_path / "keras.weights.h5"
    fastckpt.save(model, ours)
    model.save_weights(theirs)
    assert_same_arrays(datasets(theirs), datasets(ours))
    run = subprocess.run(["h5diff", "-c", str(theirs), str(ours)], capture_output=True, text=True)
    assert run.returncode == 0 and "not comparable" not in run.stdout, run.stdout + run.stderr
    wide = datasets(ours)["layers/bag/vars/0"]
    assert wide.dtype == np.asarray(keras.ops.convert_to_numpy(model.layers[2].wide.value)).dtype
    for load in (fastckpt.load, lambda m, p: m.load_weights(p)):
        for path in (ours, theirs):
            fresh = bag_model(1)
            load(fresh, path)
            assert_same_held_state(model, fresh)


def test_safetensors_holds_keras_values_and_round_trips(tmp_path):
    model = bag_model(0)
    ours, theirs = tmp_path / "ours.safetensors", tmp_path / "keras.weights.h5"
    fastckpt.save(model, ours)
    model.save_weights(theirs)
    assert_same_arrays(datasets(theirs), safetensors.numpy.load_file(str(ours)))
    fresh = bag_model(1)
    fastckpt.load(fresh, ours)
    assert_same_held_state(model, fresh)
    assert_same_held_state(model, fastckpt.load_model(ours))


def test_keras_zip_loads_in_keras_and_keras_zip_loads_in_fastckpt(tmp_path):
    model = bag_model(0)
    ours, theirs = tmp_path / "ours.keras", tmp_path / "keras.keras"
    fastckpt.save(model, ours)
    model.save(theirs)
    with zipfile.ZipFile(ours) as a, zipfile.ZipFile(theirs) as b:
        assert a.namelist()[:3] == b.namelist()[:3]
    assert_same_held_state(model, keras.saving.load_model(ours))
    assert_same_held_state(model, fastckpt.load_model(theirs))
    assert_same_held_state(model, fastckpt.load_model(ours))


def test_a_background_snapshot_holds_the_values_of_its_step(tmp_path, fault_injection):
    """The write runs slowly while every variable changes (in place under torch, new
    buffers under JAX, copy-on-write under TensorFlow): the file holds the values the save
    was asked for, as Keras's own file of that moment does."""
    model = bag_model(0, big=True)
    keras_file = tmp_path / "before.weights.h5"
    model.save_weights(keras_file)
    # Each file's commit waits this long: far longer than the assignments below.
    testing.inject_delay(1500)
    try:
        job = fastckpt.save(model, tmp_path / "ours.weights.h5", background=True)
        for v in [*model.variables, *model.optimizer.variables]:
            v.assign(keras.ops.cast(keras.ops.add(v.value, 1), v.dtype))
        assert not job.done(), "the write ended before the variables changed"
    finally:
        testing.inject_delay(0)
    job.result()
    assert_same_arrays(datasets(keras_file), datasets(tmp_path / "ours.weights.h5"))


def test_a_synchronous_save_lends_the_buffers_and_a_background_one_copies(tmp_path):
    model = bag_model(0, big=True)
    snapper = _snapshot.snapshotter_for(_walk.plan_for(model))
    fastckpt.save(model, tmp_path / "sync.weights.h5")
    assert snapper._arenas == []
    fastckpt.save(model, tmp_path / "bg.weights.h5", background=True).result()
    assert len(snapper._arenas) == 1
    assert_same_arrays(datasets(tmp_path / "sync.weights.h5"), datasets(tmp_path / "bg.weights.h5"))


class _OnDevice(_readers.Reader):
    """This backend's reader posing as one of values on an accelerator: the snapshot must
    send every value, however small, through the arena, and never lend a host buffer."""

    on_device = True

    def __init__(self, inner: _readers.Reader) -> None:
        self.inner = inner
        self.dtypes = inner.dtypes
        self.batches: list[int] = []

    def __call__(self) -> list[np.ndarray]:
        raise AssertionError("a device reader has no host buffers to lend")

    def read_into(self, views, state):
        arrays = self.inner()
        self.batches.append(len(views))
        for i, dest in views.items():
            np.copyto(dest, arrays[i])
        return [views[i] for i in range(len(arrays))]


@pytest.mark.parametrize("background", [False, True])
def test_values_on_a_device_all_go_through_the_arena(tmp_path, monkeypatch, background):
    model = bag_model(0)
    real = _readers.reader_for
    made: list[_OnDevice] = []

    def reader_for(plan, values=None):
        made.append(_OnDevice(real(plan, values)))
        return made[-1]

    monkeypatch.setattr(_snapshot, "reader_for", reader_for)
    path = tmp_path / "ours.weights.h5"
    # A fresh plan, so that its snapshotter is made with the stand-in reader.
    _walk._plans.pop(model, None)
    result = fastckpt.save(model, path, background=background)
    if background:
        result = result.result()
    plan = _walk.plan_for(model)
    assert made and made[0].batches == [len(plan.entries)], "one batch of every value"
    model.save_weights(tmp_path / "keras.weights.h5")
    assert_same_arrays(datasets(tmp_path / "keras.weights.h5"), datasets(path))


class _Recorded:
    """A JAX array that logs when its host transfer is started and when it is waited for."""

    def __init__(self, array, index: int, log: list) -> None:
        self.array, self.index, self.log = array, index, log

    def copy_to_host_async(self) -> None:
        self.log.append(("start", self.index))
        self.array.copy_to_host_async()

    def __array__(self, dtype=None, copy=None):
        self.log.append(("wait", self.index))
        return np.asarray(self.array, dtype=dtype)


class _Holder:
    def __init__(self, value) -> None:
        self.value = value


@pytest.mark.backends("jax")
def test_jax_starts_every_transfer_before_it_waits_for_any():
    plan = _walk.plan_for(bag_model(0, big=True))
    reader = _snapshot.snapshotter_for(plan)._read
    log: list = []
    real = [v.value for v in reader._variables]
    reader._variables = [_Holder(_Recorded(a, i, log)) for i, a in enumerate(real)]
    arrays = reader()
    starts = [i for kind, i in log if kind == "start"]
    assert starts == list(range(len(real)))
    assert log[: len(real)] == [("start", i) for i in range(len(real))], "a wait came first"
    for got, want in zip(arrays, real, strict=True):
        assert got.tobytes() == np.asarray(want).tobytes()


@pytest.mark.backends("torch", reason="torch's reader of CUDA tensors")
@pytest.mark.parametrize("background", [False, True])
def test_torch_on_cuda_copies_on_a_side_stream_after_the_step_and_waits_once(
    tmp_path, monkeypatch, background
):
    """torch's reader, told its values are on `cuda:0` (no test machine has a GPU: torch's
    streams and pinned allocation are stand-ins that log, the copies run on the CPU): the
    side stream first waits for the training stream, every value is copied non-blocking
    into the pinned arena inside it, and the snapshot waits once, before the file is
    written; the file equals Keras's own."""
    import contextlib

    import torch

    model = bag_model(0)
    log: list[tuple] = []
    training_stream = object()

    class Stream:
        def __init__(self, device=None) -> None:
            log.append(("stream", str(device)))

        def wait_stream(self, other) -> None:
            log.append(("wait for", "training" if other is training_stream else other))

        def synchronize(self) -> None:
            log.append(("synchronize",))

    @contextlib.contextmanager
    def on(stream):
        log.append(("enter",))
        yield
        log.append(("exit",))

    real_empty, real_copy = torch.empty, torch.Tensor.copy_

    def empty(*size, pin_memory=False, **kwargs):
        log.append(("pinned" if pin_memory else "plain", size))
        return real_empty(*size, **kwargs)

    def copy_(self, src, non_blocking=False):
        log.append(("copy", non_blocking))
        return real_copy(self, src)

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: training_stream)
    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch.Tensor, "copy_", copy_)

    class OnCuda:
        """What the reader is told a value is: its dtype, on `cuda:0`."""

        def __init__(self, value) -> None:
            self.dtype, self.device = value.dtype, torch.device("cuda", 0)

    plan = _walk.plan_for(model)
    values = {id(e.source): OnCuda(e.source.value) for e in plan.entries}
    snapper = _snapshot.snapshotter_for(plan, values)
    assert snapper.reader.on_device
    path = tmp_path / "ours.weights.h5"
    done = fastckpt.save(model, path, background=background)
    if background:
        done.result()
    log = list(log)
    model.save_weights(tmp_path / "keras.weights.h5")
    assert_same_arrays(datasets(tmp_path / "keras.weights.h5"), datasets(path))
    copies = [entry for entry in log if entry[0] == "copy"]
    assert copies == [("copy", True)] * len(plan.entries), "every value, non-blocking"
    assert [e for e in log if e[0] != "copy"] == [
        ("stream", "cuda:0"),
        ("pinned", (snapper.buffer_bytes,)),
        ("wait for", "training"),
        ("enter",),
        ("exit",),
        ("synchronize",),
    ]
    assert log[log.index(("enter",)) + 1 : log.index(("exit",))] == copies, "on the side stream"
