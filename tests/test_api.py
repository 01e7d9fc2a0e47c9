"""fastckpt.save / load / load_model against stock Keras as the oracle."""

import os
import re

import h5py
import keras
import numpy as np
import pytest
import safetensors.numpy
from safetensors import safe_open

import fastckpt
from conftest import assert_same_state, small_architecture, small_model
from fastckpt import CheckpointContentError, _walk


def keras_h5_tree(model, tmp_path):
    """Groups (with their attributes) and datasets of Keras's own `.weights.h5`."""
    path = tmp_path / "keras.weights.h5"
    model.save_weights(path)
    groups, datasets = {}, []
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                datasets.append(name)
            elif name.endswith("vars"):
                groups[name] = dict(obj.attrs)

        f.visititems(visit)
    return groups, datasets


def test_plan_names_match_keras_weights_file(tmp_path, trained_model):
    plan = _walk.walk(trained_model)
    groups, datasets = keras_h5_tree(trained_model, tmp_path)
    assert sorted(e.path for e in plan.entries) == sorted(datasets)
    assert dict(plan.groups) == groups
    assert plan.entries[0].path == "layers/dense/vars/0"
    assert not plan.dynamic


def test_plan_is_reused_until_variables_change():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    first = _walk.plan_for(model)
    assert _walk.plan_for(model) is first
    model.optimizer.build(model.trainable_variables)  # new optimizer variables appear
    assert _walk.plan_for(model) is not first


def test_save_then_load_restores_everything_bit_exact(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    result = fastckpt.save(trained_model, path)
    assert result.path == str(path) and result.bytes == os.path.getsize(path)
    fresh = small_model(seed=1)  # different values, same architecture
    fastckpt.load(fresh, path)
    assert_same_state(trained_model, fresh)


def test_load_builds_an_unbuilt_optimizer(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    fastckpt.save(trained_model, path)
    model = small_architecture()
    assert not model.optimizer.built
    fastckpt.load(model, path)
    assert_same_state(trained_model, model)


def test_load_model_rebuilds_from_the_config(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    fastckpt.save(trained_model, path)
    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
    assert meta["keras_version"] == keras.__version__ and "keras.config" in meta
    loaded = fastckpt.load_model(path)
    assert_same_state(trained_model, loaded)
    x = np.ones((2, 4), "float32")
    assert np.array_equal(loaded.predict(x, verbose=0), trained_model.predict(x, verbose=0))


def test_weights_only_file_has_no_config(tmp_path, trained_model):
    path = tmp_path / "w.safetensors"
    fastckpt.save(trained_model, path, weights_only=True, include_optimizer=False)
    with safe_open(str(path), framework="numpy") as f:
        assert "keras.config" not in f.metadata()
        assert not any(k.startswith("optimizer/") for k in f.keys())
    with pytest.raises(CheckpointContentError, match="no model config"):
        fastckpt.load_model(path)
    fresh = small_model(seed=3)
    fastckpt.load(fresh, path)
    for a, b in zip(trained_model.variables, fresh.variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


def test_shape_mismatch_names_the_variable(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    fastckpt.save(trained_model, path, include_optimizer=False)
    other = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(3),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2, name="head"),
        ]
    )
    with pytest.raises(
        CheckpointContentError,
        match=r"layers/dense/vars/0: the file holds "
        r"float32 \(4, 3\), the model has float32 \(5, 3\)",
    ):
        fastckpt.load(other, path)


@pytest.mark.backends("tensorflow", "torch")  # under JAX (x64 off) float64 holds float32
def test_dtype_mismatch_names_the_variable(tmp_path):
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float64")])
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float32")])
    path = tmp_path / "d.safetensors"
    fastckpt.save(a, path)
    with pytest.raises(
        CheckpointContentError, match=r"layers/dense/vars/0: the file holds float64"
    ):
        fastckpt.load(b, path)


def test_a_float16_file_does_not_load_into_a_float32_model(tmp_path):
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float16")])
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float32")])
    path = tmp_path / "d.safetensors"
    fastckpt.save(a, path)
    with pytest.raises(
        CheckpointContentError,
        match=r"layers/dense/vars/0: the file holds float16 \(2, 2\), the model has float32",
    ):
        fastckpt.load(b, path)


@pytest.mark.filterwarnings("ignore:Explicitly requested dtype float64:UserWarning")  # JAX
def test_a_float32_file_loads_into_a_float64_model(tmp_path):
    """What a float64 variable saved under JAX (x64 off) holds: float32 values, loaded
    into the float64 variable of the same model on TensorFlow or torch, every value kept."""
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float32")])
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float64")])
    path = tmp_path / "d.safetensors"
    fastckpt.save(a, path)
    fastckpt.load(b, path)
    held = np.asarray(keras.ops.convert_to_numpy(b.layers[0].kernel.value))
    assert held.tobytes() == np.asarray(a.layers[0].kernel.numpy()).astype(held.dtype).tobytes()


def counter_model(dtype: str, value: int) -> keras.Model:
    """A model whose one variable is a non-trainable integer (torch requires integers to
    be non-trainable) of `dtype`, holding `value`."""

    class Counter(keras.layers.Layer):
        def build(self, input_shape):
            self.count = self.add_weight(
                shape=(), dtype=dtype, initializer="zeros", trainable=False
            )

        def call(self, x):
            return x

    model = keras.Sequential([keras.Input((2,)), Counter(name="counter")])
    model.layers[0].count.assign(value)
    return model


# Under JAX (x64 off) an int64 variable holds int32 values: no file of it holds int64.
@pytest.mark.backends("tensorflow", "torch")
def test_int64_values_load_into_an_int32_variable_when_they_fit(tmp_path):
    """Keras's "int" (an optimizer's iteration count) is int64 under TensorFlow, int32
    under JAX and torch."""
    path = tmp_path / "c.safetensors"
    fastckpt.save(counter_model("int64", 7), path)
    b = counter_model("int32", 0)
    fastckpt.load(b, path)
    assert int(keras.ops.convert_to_numpy(b.layers[0].count.value)) == 7
    fastckpt.save(counter_model("int64", 2**40), path)
    with pytest.raises(
        CheckpointContentError,
        match=r"layers/counter/vars/0: the file holds int64 values that int32 cannot hold",
    ):
        fastckpt.load(b, path)
    assert int(keras.ops.convert_to_numpy(b.layers[0].count.value)) == 7, "nothing assigned"


def test_missing_and_extra_variables_are_listed(tmp_path):
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2), keras.layers.Dense(2)])
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    path = tmp_path / "m.safetensors"
    fastckpt.save(a, path)
    with pytest.raises(
        CheckpointContentError, match="not in the model 2 variables: layers/dense_1"
    ):
        fastckpt.load(b, path)


def test_corrupt_payload_is_caught_by_the_checksum(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    fastckpt.save(trained_model, path)
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointContentError, match="checksum mismatch"):
        fastckpt.load(small_model(), path)


def test_background_save_returns_a_job(tmp_path, trained_model):
    job = fastckpt.save(trained_model, tmp_path / "bg.safetensors", background=True)
    assert isinstance(job, fastckpt.SaveJob)
    result = job.result(timeout=60)
    assert job.done() and job.exception() is None
    assert os.path.getsize(result.path) == result.bytes


class ManyWeights(keras.layers.Layer):
    """One layer holding `n` small variables: a model with thousands of variables that
    builds in milliseconds (a 5,000-layer functional model takes minutes)."""

    def __init__(self, n, **kwargs):
        super().__init__(**kwargs)
        self.n = n

    def build(self, input_shape):
        self.ws = [self.add_weight(shape=(i % 5 + 1,), initializer="normal") for i in range(self.n)]

    def call(self, x):
        return x


def test_a_model_with_thousands_of_variables(tmp_path):
    # Keras's add_weight costs ~2 ms a variable, so the model-level check uses 2,000;
    # test_native.py round-trips 10,000 tensors through the writer itself.
    model = keras.Sequential([keras.Input((1,)), ManyWeights(2_000)])
    path = tmp_path / "big.safetensors"
    fastckpt.save(model, path, threads=2)
    with safe_open(str(path), framework="numpy") as f:
        assert len(f.keys()) == 2_000
    keras_path = tmp_path / "big.weights.h5"
    model.save_weights(keras_path)  # Keras's own file is the oracle for names and values
    for v in model.variables[:50]:
        v.assign(np.zeros(v.shape, v.dtype))
    fastckpt.load(model, path)
    with h5py.File(keras_path) as f, safe_open(str(path), framework="numpy") as g:
        names = []
        f.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
        assert sorted(names) == sorted(g.keys())
        for name in names[::100]:
            assert np.array_equal(f[name][()], g.get_tensor(name))
    with h5py.File(keras_path) as f:
        for i, v in enumerate(model.variables[:50]):
            assert np.array_equal(f[f"layers/many_weights/vars/{i}"][()], v.numpy())


@pytest.mark.parametrize(
    ("target", "error", "words"),
    [
        (
            "model.ckpt",
            ValueError,
            "must end in one of .weights.h5, .weights.json, .zst.safetensors, .safetensors",
        ),
        ("gs://bucket/m.safetensors", ValueError, "local files only"),
    ],
)
def test_bad_paths(tmp_path, trained_model, target, error, words):
    with pytest.raises(error, match=re.escape(words)):
        fastckpt.save(trained_model, target if "://" in target else tmp_path / target)


def test_not_a_keras_model(tmp_path):
    with pytest.raises(TypeError, match=r"fastckpt saves Keras models; got builtins\.dict"):
        fastckpt.save({"w": np.ones(3)}, tmp_path / "x.safetensors")


def test_overwrite_false_refuses_an_existing_file(tmp_path, trained_model):
    path = tmp_path / "m.safetensors"
    path.write_bytes(b"previous")
    with pytest.raises(FileExistsError):
        fastckpt.save(trained_model, path, overwrite=False)
    assert path.read_bytes() == b"previous"


@pytest.mark.parametrize("version", ["3.11.3", "3.16.0", "4.0.0"])
def test_unsupported_keras_version_is_named(version):
    from fastckpt import _keras_private

    with pytest.raises(
        ImportError, match=rf"fastckpt supports keras>=3.12,<3.16, but keras {version} is"
    ):
        _keras_private.check_keras_version(version)
    for supported in ("3.12.4", "3.13.2", "3.14.1", "3.15.1"):
        _keras_private.check_keras_version(supported)


def test_snapshot_buffers_are_never_shared_by_two_saves_in_flight(tmp_path):
    """A large variable is copied into a reused host arena: a second save while the first
    is still writing must get its own buffers, and a failed hand-off frees its arena."""
    from fastckpt import _snapshot

    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512)])  # 1 MiB kernel
    plan = _walk.plan_for(model, include_optimizer=False)
    snapper = _snapshot.snapshotter_for(plan)
    first = snapper.take()
    second = snapper.take()  # the first is neither lent nor released: still reserved
    assert first.arrays[0] is not second.arrays[0]
    assert not np.shares_memory(first.arrays[0], second.arrays[0])
    second.release()
    third = snapper.take()
    assert third.arrays[0] is second.arrays[0]  # reused, not reallocated
    first.release()
    third.release()
    # This save fails after its snapshot (no max_shard_size): its arena must come back.
    with pytest.raises(ValueError, match="needs `max_shard_size`"):
        fastckpt.save(model, tmp_path / "x.weights.json", include_optimizer=False)
    assert len(snapper._arenas) == 2 and all(a.free() for a in snapper._arenas)


@pytest.mark.parametrize("shape", [(), (0, 3), (7,), (1024, 1024)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int64", "bool"])
def test_tensors_read_start_on_the_boundary_at_which_assigns_adopt_them(tmp_path, shape, dtype):
    # TensorFlow and XLA take an assigned NumPy array's memory when it is 64-byte aligned,
    # and copy it otherwise.
    from fastckpt import formats
    from fastckpt.formats._reading import numpy_dtype

    value = np.arange(int(np.prod(shape)), dtype=np.int64).astype(numpy_dtype(dtype)).reshape(shape)
    path = tmp_path / "t.safetensors"
    safetensors.numpy.save_file({"t": value}, str(path))
    (read,) = formats.open_checkpoint(str(path)).read(["t"]).values()
    assert read.size == 0 or read.ctypes.data % 64 == 0  # (an empty array has no data)
    assert read.dtype == value.dtype and read.shape == shape
    np.testing.assert_array_equal(read, value)
