"""Keras-compatible files, judged by oracles that are not our code: stock Keras loading,
`h5diff` against Keras's own file of the same model, `h5dump`, h5py (read and `r+` edit),
and Python's `zipfile`."""

import gc
import json
import os
import subprocess
import warnings
import zipfile

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

import fastckpt

rng = np.random.default_rng(0)


@keras.saving.register_keras_serializable("fastckpt_tests")
class Scaled(keras.layers.Layer):
    """A layer with its own `save_own_variables` storing a plain value next to a variable
    (so fastckpt's plan is dynamic and must be re-walked every save)."""

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(input_shape[-1],), initializer="ones")
        self.calls = np.zeros((), "int64")

    def call(self, x):
        return x * self.scale

    def save_own_variables(self, store):
        store["0"] = self.scale
        store["calls"] = np.asarray(self.calls + 41)

    def load_own_variables(self, store):
        self.scale.assign(store["0"])
        self.calls = np.asarray(store["calls"]) - 41


@keras.saving.register_keras_serializable("fastckpt_tests")
class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(6)
        self.norm = keras.layers.BatchNormalization()
        self.scaled = Scaled()
        self.out = keras.layers.Dense(2)

    def call(self, x):
        return self.out(self.scaled(self.norm(self.dense(x))))


def sequential():
    return (
        keras.Sequential(
            [
                keras.Input((4,)),
                keras.layers.Dense(3),
                keras.layers.BatchNormalization(),
                keras.layers.Dense(2, name="head"),
            ]
        ),
        "adam",
        np.float32,
    )


def functional():
    inputs = keras.Input((5,), dtype="int32")
    x = keras.layers.Embedding(20, 4)(inputs)
    x = keras.layers.LSTM(3)(x)
    outputs = keras.layers.Dense(2)(x)
    return keras.Model(inputs, outputs), keras.optimizers.SGD(0.01, momentum=0.9), np.int32


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 4), "float32"))  # builds every sublayer
    return model, "adam", np.float32


def bf16_variables():
    return (
        keras.Sequential(
            [keras.Input((4,)), keras.layers.Dense(3, dtype="bfloat16"), keras.layers.Dense(2)]
        ),
        "sgd",
        np.float32,
    )


def make(builder, seed, policy=None):
    keras.utils.set_random_seed(seed)
    keras.config.set_dtype_policy(policy or "float32")
    try:
        model, optimizer, xdtype = builder()
        model.compile(optimizer=optimizer, loss="mse")
        if xdtype == np.int32:
            x = rng.integers(0, 20, size=(8, 5)).astype("int32")
        else:
            x = rng.normal(size=(8, 4)).astype("float32")
        model.fit(x, np.ones((8, 2), "float32"), epochs=1, batch_size=4, verbose=0)
    finally:
        keras.config.set_dtype_policy("float32")
    return model


CASES = {
    "sequential": (sequential, None),
    "functional": (functional, None),
    "subclassed": (subclassed, None),
    "bf16_variables": (bf16_variables, None),
    "mixed_float16": (sequential, "mixed_float16"),
    "mixed_bfloat16": (functional, "mixed_bfloat16"),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request):
    builder, policy = CASES[request.param]
    return make(builder, 1, policy), lambda: make(builder, 2, policy)


def saved_variables(model):
    # Keras does not save SeedGenerator states (they are not KerasSaveable): neither does
    # its own file, so they are not part of what must round-trip.
    return [v for v in model.variables if "seed_generator_state" not in v.path]


def state(model):
    values = [np.asarray(v.numpy()) for v in saved_variables(model)]
    if model.optimizer is not None:
        values += [np.asarray(v.numpy()) for v in model.optimizer.variables]
    return values


def assert_bit_exact(a, b):
    sa, sb = state(a), state(b)
    assert len(sa) == len(sb)
    for x, y in zip(sa, sb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def h5diff(a, b):
    run = subprocess.run(["h5diff", "-c", str(a), str(b)], capture_output=True, text=True)
    # h5diff exits 0 even when it printed "not comparable": read its words too.
    assert run.returncode == 0 and "not comparable" not in run.stdout, run.stdout + run.stderr


def test_weights_h5_matches_keras(tmp_path, case):
    model, twin = case
    ours, theirs = tmp_path / "ours.weights.h5", tmp_path / "keras.weights.h5"
    fastckpt.save(model, ours)
    model.save_weights(theirs)
    h5diff(theirs, ours)
    assert subprocess.run(["h5dump", "-H", str(ours)], capture_output=True).returncode == 0
    other = twin()
    other.load_weights(ours)  # stock Keras
    assert_bit_exact(model, other)
    back = twin()
    fastckpt.load(back, theirs)  # fastckpt reads Keras's own file
    assert_bit_exact(model, back)


def keras_outcome(load):
    """What stock Keras does with a file: the loaded model, or the error it raised. Keras's
    own warnings (e.g. skipping an optimizer whose config 3.15 did not keep) are not ours
    to judge, so they do not become errors here."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return load(), None
        except Exception as e:  # compared with Keras's outcome on its own file
            return None, e


def assert_keras_treats_both_alike(load, ours, theirs, model):
    """Stock Keras must load our file exactly as it loads its own file of the same model:
    to the same weights, or with the same error where it cannot load its own either."""
    (got, err), (_, want_err) = (
        keras_outcome(lambda: load(ours)),
        keras_outcome(lambda: load(theirs)),
    )
    assert type(err) is type(want_err), (err, want_err)
    if want_err is not None:
        return
    for x, y in zip(saved_variables(model), saved_variables(got), strict=True):
        assert np.asarray(x.numpy()).tobytes() == np.asarray(y.numpy()).tobytes(), x.path


def test_keras_zip_loads_in_keras(tmp_path, case):
    model, _ = case
    path, keras_path = tmp_path / "m.keras", tmp_path / "k.keras"
    fastckpt.save(model, path)
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert zf.namelist()[:3] == ["metadata.json", "config.json", "model.weights.h5"]
        assert all(i.compress_type == zipfile.ZIP_STORED for i in zf.infolist())
        assert json.loads(zf.read("metadata.json"))["keras_version"] == keras.__version__
    model.save(keras_path)
    assert_keras_treats_both_alike(keras.saving.load_model, path, keras_path, model)
    # and Keras's own .keras file reads back through fastckpt, bit-exact
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # see keras_outcome
        ours = fastckpt.load_model(keras_path)
    for x, y in zip(saved_variables(model), saved_variables(ours), strict=True):
        assert np.asarray(x.numpy()).tobytes() == np.asarray(y.numpy()).tobytes(), x.path


def test_legacy_h5_loads_in_keras(tmp_path, case):
    model, _ = case
    ours, theirs = tmp_path / "ours.h5", tmp_path / "keras.h5"
    fastckpt.save(model, ours)
    with warnings.catch_warnings():  # Keras's own legacy saver trips numpy deprecations
        warnings.simplefilter("ignore")
        model.save(theirs)
    h5diff(theirs, ours)
    custom = {"Subclassed": Subclassed, "Scaled": Scaled}  # legacy configs use bare names

    def load(p):
        return keras.saving.load_model(p, compile=False, custom_objects=custom)

    assert_keras_treats_both_alike(load, ours, theirs, model)


def test_h5py_edits_our_file_in_place(tmp_path):
    model = make(sequential, 3)
    path = tmp_path / "m.weights.h5"
    fastckpt.save(model, path)
    with h5py.File(path, "r+") as f:
        f["layers/dense/vars/0"][...] = np.full((4, 3), 7, "float32")
        f["layers/dense/vars"].attrs["note"] = "edited"
        f.create_dataset("extra", data=np.arange(5))
    with h5py.File(path, "r") as f:
        assert np.all(f["layers/dense/vars/0"][()] == 7)
        assert f["layers/dense/vars"].attrs["note"] == "edited"
        assert f["layers/dense/vars"].attrs["name"] == model.layers[0].name
        assert list(f["extra"][()]) == [0, 1, 2, 3, 4]


def test_bf16_is_opaque_with_a_dtype_attribute(tmp_path):
    model = make(bf16_variables, 4)
    path = tmp_path / "m.weights.h5"
    fastckpt.save(model, path)
    with h5py.File(path, "r") as f:
        ds = f["layers/dense/vars/0"]
        assert ds.dtype.kind == "V" and ds.dtype.itemsize == 2
        assert ds.attrs["dtype"] == "bfloat16"  # a str: vlen UTF-8, as Keras checks it
        raw = ds[()].view(np.uint16)
    expected = np.asarray(model.layers[0].kernel.numpy()).astype(ml_dtypes.bfloat16)
    assert raw.tobytes() == expected.view(np.uint16).tobytes()


def test_sharded_weights_match_keras(tmp_path):
    model = make(sequential, 5)
    big = keras.Sequential([keras.Input((64,)), keras.layers.Dense(256), keras.layers.Dense(8)])
    big.compile("adam", "mse")
    big.fit(np.ones((4, 64)), np.ones((4, 8)), verbose=0)
    (tmp_path / "k").mkdir()
    (tmp_path / "o").mkdir()
    big.save_weights(tmp_path / "k" / "m.weights.json", max_shard_size=0.0001)
    result = fastckpt.save(big, tmp_path / "o" / "m.weights.json", max_shard_size=0.0001)
    assert sorted(os.listdir(tmp_path / "k")) == sorted(os.listdir(tmp_path / "o"))
    assert len(result.paths) == len(os.listdir(tmp_path / "o")) > 2
    assert (tmp_path / "k" / "m.weights.json").read_bytes() == (
        tmp_path / "o" / "m.weights.json"
    ).read_bytes()
    for shard in sorted(os.listdir(tmp_path / "k")):
        if shard.endswith(".h5"):
            h5diff(tmp_path / "k" / shard, tmp_path / "o" / shard)
    twin = keras.models.clone_model(big)
    twin.compile("adam", "mse")
    twin.fit(np.ones((4, 64)), np.ones((4, 8)), verbose=0)
    twin.load_weights(tmp_path / "o" / "m.weights.json")
    assert_bit_exact(big, twin)
    with pytest.raises(ValueError, match="exceeds the maximum shard size"):
        fastckpt.save(big, tmp_path / "o" / "x.weights.json", max_shard_size=0.00001)
    with pytest.raises(ValueError, match="needs `max_shard_size`"):
        fastckpt.save(model, tmp_path / "o" / "y.weights.json")


def test_a_dynamic_plan_is_walked_every_save(tmp_path):
    model = make(subclassed, 6)
    path = tmp_path / "m.weights.h5"
    model.layers[2].calls = np.asarray(5)
    fastckpt.save(model, path)
    model.layers[2].calls = np.asarray(9)
    fastckpt.save(model, path)
    with h5py.File(path, "r") as f:
        assert int(f["layers/scaled/vars/calls"][()]) == 9 + 41
    twin = make(subclassed, 7)
    fastckpt.load(twin, path)
    assert int(twin.layers[2].calls) == 9


@pytest.mark.slow
def test_keras_zip_over_4_gib(tmp_path):
    """zip64: a `.keras` file past 4 GiB opens with zipfile and loads in Keras."""
    big = keras.Sequential(
        [
            keras.Input((32768,)),
            keras.layers.Dense(33000, use_bias=False, kernel_initializer="ones"),
        ]
    )
    path = tmp_path / "big.keras"
    fastckpt.save(big, path, include_optimizer=False)
    probe = big.layers[0].kernel.numpy()[::4096, ::4096].copy()
    del big  # keep the peak at two copies of the 4.3 GB kernel
    gc.collect()
    assert os.path.getsize(path) > 4 * 2**30
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("model.weights.h5")
        assert info.file_size > 4 * 2**30 and info.compress_type == zipfile.ZIP_STORED
    loaded = keras.saving.load_model(path, compile=False)
    w = loaded.layers[0].kernel.numpy()
    assert np.array_equal(w[::4096, ::4096], probe)


def test_keras_zip_carries_assets(tmp_path):
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["red", "green", "green", "blue"]))
    inputs = keras.Input((1,), dtype="string")
    model = keras.Model(inputs, lookup(inputs))
    path, keras_path = tmp_path / "m.keras", tmp_path / "k.keras"
    fastckpt.save(model, path)
    fastckpt.save(model, path)  # the second save reuses what the first learnt about assets
    model.save(keras_path)
    with zipfile.ZipFile(path) as ours, zipfile.ZipFile(keras_path) as theirs:
        assets = sorted(n for n in theirs.namelist() if n.startswith("assets/"))
        assert assets and sorted(n for n in ours.namelist() if n.startswith("assets/")) == assets
        for name in assets:
            assert ours.read(name) == theirs.read(name)
    loaded = keras.saving.load_model(path)
    assert loaded.layers[-1].get_vocabulary() == lookup.get_vocabulary()
