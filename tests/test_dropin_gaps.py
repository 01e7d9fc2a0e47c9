"""The drop-in gaps users hit first, each against stock Keras's own behaviour: a model not
built yet, `custom_objects`, a missing file, a mismatched variable's message, and a layer
reachable under two attribute names."""

import re

import keras
import numpy as np
import pytest

import fastckpt
from conftest import assert_same_state
from fastckpt import CheckpointContentError, CheckpointNotFoundError

UNBUILT = "You are saving a model that has not yet been built"


def unbuilt_model() -> keras.Model:
    """A compiled Sequential with no input shape: no layer has weights yet."""
    model = keras.Sequential([keras.layers.Dense(3), keras.layers.Dense(2, name="head")])
    model.compile(optimizer="adam", loss="mse", metrics=["mae"])
    return model


def assert_unbuilt_and_compiled(model: keras.Model) -> None:
    assert not model.built
    assert not model.weights
    assert model.compiled
    assert isinstance(model.optimizer, keras.optimizers.Adam)
    assert model.loss == "mse"


@pytest.mark.parametrize("suffix", [".keras", ".safetensors", ".zst.safetensors"])
def test_an_unbuilt_model_is_saved_with_its_config_as_keras_saves_it(tmp_path, suffix):
    model = unbuilt_model()
    theirs = tmp_path / "keras.keras"
    with pytest.warns(UserWarning, match=UNBUILT):
        model.save(theirs)
    ours = tmp_path / f"ours{suffix}"
    with pytest.warns(UserWarning, match=UNBUILT):
        fastckpt.save(model, ours)
    loaded = [keras.saving.load_model(theirs), fastckpt.load_model(theirs)]
    if suffix == ".keras":
        loaded.append(keras.saving.load_model(ours))
    loaded.append(fastckpt.load_model(ours))
    for back in loaded:
        assert_unbuilt_and_compiled(back)
    # It builds and trains as Keras's own rebuilt model does.
    x = np.ones((4, 5), "float32")
    for back in loaded:
        back.fit(x, x[:, :2], epochs=1, verbose=0)
        assert back.built and len(back.weights) == 4


def test_an_unbuilt_model_is_saved_in_the_legacy_layout_as_keras_saves_it(tmp_path):
    model = unbuilt_model()
    theirs, ours = tmp_path / "keras.h5", tmp_path / "ours.h5"
    model.save(theirs)
    with pytest.warns(UserWarning, match=UNBUILT):
        fastckpt.save(model, ours)
    for path in (theirs, ours):
        back = keras.saving.load_model(path, compile=False)
        assert not back.built and [type(x) for x in back.layers] == [keras.layers.Dense] * 2


def test_an_unbuilt_model_without_compile_comes_back_uncompiled(tmp_path):
    model = keras.Sequential([keras.layers.Dense(3)])
    path = tmp_path / "m.keras"
    with pytest.warns(UserWarning, match=UNBUILT):
        fastckpt.save(model, path)
    for back in (keras.saving.load_model(path), fastckpt.load_model(path)):
        assert not back.built and not back.compiled


@pytest.mark.parametrize("suffix", [".weights.h5", ".weights.json"])
def test_the_weights_of_an_unbuilt_model_are_refused_as_keras_refuses_them(tmp_path, suffix):
    model = unbuilt_model()
    with pytest.raises(ValueError, match=UNBUILT) as keras_error:
        model.save_weights(tmp_path / "keras.weights.h5")
    with pytest.raises(ValueError, match=re.escape(str(keras_error.value))):
        fastckpt.save(model, tmp_path / f"ours{suffix}", max_shard_size=1)
    assert not list(tmp_path.iterdir())


class Scale(keras.layers.Layer):
    """A custom layer Keras cannot find by name unless told (not registered)."""

    def __init__(self, factor: float = 2.0, **kwargs):
        super().__init__(**kwargs)
        self.factor = factor

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones", name="w")

    def call(self, x):
        return x * self.w * self.factor

    def get_config(self):
        return {**super().get_config(), "factor": self.factor}


def custom_model() -> keras.Model:
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(4), Scale(3.0)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(3).normal(size=(8, 4)).astype("float32")
    model.fit(x, x, epochs=1, verbose=0)
    return model


@pytest.mark.parametrize("suffix", [".keras", ".safetensors"])
def test_load_model_takes_custom_objects_as_keras_does(tmp_path, suffix):
    model = custom_model()
    path = tmp_path / f"m{suffix}"
    fastckpt.save(model, path)
    keras_path = tmp_path / "keras.keras"
    model.save(keras_path)
    # Without being told, neither finds the class.
    with pytest.raises(TypeError, match="Scale"):
        keras.saving.load_model(keras_path)
    with pytest.raises((TypeError, ValueError), match="Scale"):
        fastckpt.load_model(path)
    expected = keras.saving.load_model(keras_path, custom_objects={"Scale": Scale})
    by_keyword = fastckpt.load_model(path, custom_objects={"Scale": Scale})
    positional = fastckpt.load_model(path, {"Scale": Scale})  # Keras's argument order
    with keras.saving.custom_object_scope({"Scale": Scale}):
        scoped = fastckpt.load_model(path)
    for back in (expected, by_keyword, positional, scoped):
        assert isinstance(back.layers[-1], Scale) and back.layers[-1].factor == 3.0
        assert_same_state(model, back)


# What stock Keras's load_model raises for a missing file of each kind (None: it reads none).
KERAS_MISSING = {
    ".keras": ValueError,
    ".h5": FileNotFoundError,
    ".safetensors": None,
    ".zst.safetensors": None,
}


@pytest.mark.parametrize("suffix", list(KERAS_MISSING))
def test_a_missing_file_raises_what_keras_raises_and_what_the_os_says(tmp_path, suffix):
    missing = tmp_path / f"none{suffix}"
    if KERAS_MISSING[suffix] is not None:
        with pytest.raises(KERAS_MISSING[suffix]):
            keras.saving.load_model(missing)
    # One exception serves code written for either.
    with pytest.raises(ValueError) as error:
        fastckpt.load_model(missing)
    assert isinstance(error.value, FileNotFoundError)
    assert isinstance(error.value, CheckpointNotFoundError)
    assert error.value.filename == str(missing)


@pytest.mark.parametrize("suffix", [".weights.h5", ".weights.json", ".keras", ".safetensors"])
def test_load_of_a_missing_file_is_both_errors_too(tmp_path, suffix):
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    with pytest.raises(FileNotFoundError):  # Keras's
        model.load_weights(tmp_path / "none.weights.h5")
    with pytest.raises(FileNotFoundError) as error:
        fastckpt.load(model, tmp_path / f"none{suffix}")
    assert isinstance(error.value, ValueError) and isinstance(error.value, CheckpointNotFoundError)


def test_a_mismatched_variable_names_it_in_our_words_and_in_keras_s(tmp_path):
    a = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    b = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    path = tmp_path / "a.weights.h5"
    a.save_weights(path)
    with pytest.raises(ValueError, match="must match") as keras_error:
        b.load_weights(path)
    assert "target variable" in str(keras_error.value)
    with pytest.raises(CheckpointContentError) as ours:
        fastckpt.load(b, path)
    message = str(ours.value)
    assert "layers/dense/vars/0: the file holds float32 (4, 3), the model has float32 (5, 3)" in (
        message
    )
    assert "the shape of the target variable and the shape of the target value" in message
    assert "must match" in message


def test_a_dtype_mismatch_has_keras_s_words_for_the_dtype(tmp_path):
    a = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float64")])
    b = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2, dtype="float32")])
    path = tmp_path / "a.safetensors"
    fastckpt.save(a, path)
    with pytest.raises(
        CheckpointContentError, match=r"the dtype of the target variable.*must match"
    ):
        fastckpt.load(b, path)


class Written(keras.Model):
    """The model as it was when its files were written: the encoder under `z_encoder`."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.z_encoder = keras.layers.Dense(3, name="enc")
        self.head = keras.layers.Dense(2, name="head")

    def call(self, x):
        return self.head(self.z_encoder(x))


class Renamed(keras.Model):
    """The same model after a rename: the encoder is tracked as `encoder` (which the
    traversal reaches first), and a property keeps the old name working."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder = keras.layers.Dense(3, name="enc")
        self.head = keras.layers.Dense(2, name="head")

    @property
    def z_encoder(self):
        return self.encoder

    def call(self, x):
        return self.head(self.encoder(x))


def built(cls, seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    model = cls()
    model(np.zeros((1, 4), "float32"))
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(seed).normal(size=(8, 4)).astype("float32")
    model.fit(x, x[:, :2], epochs=1, verbose=0)
    return model


@pytest.mark.parametrize(
    ("writer", "suffix"),
    [("keras", ".weights.h5"), ("fastckpt", ".weights.h5"), ("fastckpt", ".safetensors")],
)
def test_a_layer_aliased_by_a_property_loads_from_the_path_the_file_has(tmp_path, writer, suffix):
    source = built(Written, 0)
    path = tmp_path / f"m{suffix}"
    if writer == "keras":
        source.save_weights(path)
    else:
        fastckpt.save(source, path)
    if suffix == ".weights.h5":
        # Keras's loading finds the encoder through the alias.
        theirs = built(Renamed, 1)
        theirs.load_weights(path)
        assert_same_state(source, theirs)
    ours = built(Renamed, 1)
    fastckpt.load(ours, path)
    assert_same_state(source, ours)


def test_an_alias_does_not_hide_a_variable_the_file_lacks(tmp_path):
    source = built(Written, 0)
    path = tmp_path / "m.safetensors"
    fastckpt.save(source, path, include_optimizer=False)
    bigger = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(2)])
    with pytest.raises(CheckpointContentError, match="does not match the model: missing"):
        fastckpt.load(bigger, path)


def test_a_legacy_save_leaves_the_model_s_compile_state_as_it_was(tmp_path):
    # Keras's own legacy saver pops the optimizer out of the model's compile config, so
    # that the model's next `.keras` file comes back with the default optimizer.
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    before = model.get_compile_config()
    fastckpt.save(model, tmp_path / "m.h5")
    assert model.get_compile_config() == before
    fastckpt.save(model, tmp_path / "m.keras")
    assert isinstance(fastckpt.load_model(tmp_path / "m.keras").optimizer, keras.optimizers.Adam)
