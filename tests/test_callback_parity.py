"""fastckpt.ModelCheckpoint against keras.callbacks.ModelCheckpoint, side by side.

Each case trains the same model twice (same seed, same data, same order): once with Keras's
callback, once with ours. Then the two runs must agree on the files written (names), what was
printed (Keras's lines exactly; ours append "(size in time)" to "finished saving" lines),
the warnings, the exception raised, and the contents: every file of ours loads in stock
Keras (or the `safetensors` package) to the same values, bit for bit, as Keras's file of the
same save. The expected values are never copies of Keras's text: they are what Keras does.

Keras cannot write `.safetensors`: those cases run Keras with the `.weights.h5` file of the
same name and `save_weights_only=True` (the same values), and map the suffix when comparing.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import warnings

import keras
import numpy as np
import pytest

import fastckpt
from callback_support import (
    assert_same_checkpoint,
    assert_same_messages,
    callback_warnings,
    fit_with,
    fresh_model,
)
from fastckpt import callbacks as fastckpt_callbacks

SAFETENSORS = ".safetensors"


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    filepath: str  # our file name template; Keras's is the same with `.weights.h5`
    kwargs: dict = dataclasses.field(default_factory=dict)
    steps_per_execution: int = 1
    validation: bool = True
    epochs: int = 4
    warns: bool = False  # Keras warns (so the case tests the warnings)
    raises: bool = False  # Keras raises (so the case tests the exception)

    @property
    def ours_weights_only(self) -> bool:
        return bool(self.kwargs.get("save_weights_only", False))

    @property
    def mapped(self) -> bool:
        return self.filepath.endswith(SAFETENSORS)

    def keras_filepath(self) -> str:
        if self.mapped:
            return self.filepath[: -len(SAFETENSORS)] + ".weights.h5"
        return self.filepath

    def keras_kwargs(self) -> dict:
        return {**self.kwargs, "save_weights_only": True} if self.mapped else dict(self.kwargs)

    def to_ours(self, text: str) -> str:
        return text.replace(".weights.h5", SAFETENSORS) if self.mapped else text


def run_both(case: Case, tmp_path, *, background: bool = True):
    common = dict(
        steps_per_execution=case.steps_per_execution,
        validation=case.validation,
        epochs=case.epochs,
    )
    theirs = fit_with(
        lambda d: keras.callbacks.ModelCheckpoint(
            os.path.join(d, case.keras_filepath()), **case.keras_kwargs()
        ),
        tmp_path,
        "keras",
        **common,
    )
    ours = fit_with(
        lambda d: fastckpt.ModelCheckpoint(
            os.path.join(d, case.filepath), save_on_background=background, **case.kwargs
        ),
        tmp_path,
        "ours",
        **common,
    )
    return theirs, ours


def assert_parity(case: Case, theirs, ours, *, background: bool = True) -> None:
    m = case.to_ours
    assert bool(theirs.warnings) == case.warns, theirs.warnings
    assert (theirs.error is not None) == case.raises, theirs.error
    expected_error = theirs.error and (theirs.error[0], m(theirs.error[1]))
    assert ours.error == expected_error
    # Same training: anything else would make the rest meaningless.
    assert ours.history == theirs.history
    assert ours.warnings == [(cat, m(msg)) for cat, msg in theirs.warnings]
    assert_same_messages([m(line) for line in theirs.lines], ours.lines, background)
    assert ours.files == [m(name) for name in theirs.files]
    for name in theirs.files:
        assert_same_checkpoint(
            theirs.dir / name, ours.dir / m(name), weights_only=case.ours_weights_only
        )


# SafeTensors: what fastckpt writes today. ---------------------------------------------------
CASES = [
    Case("every_epoch_named_full", "{epoch:02d}-{val_loss:.2f}.safetensors", dict(verbose=1)),
    Case(
        "every_epoch_named_weights",
        "w-{epoch:02d}-{val_accuracy:.3f}.safetensors",
        dict(save_weights_only=True, verbose=1),
    ),
    Case("every_epoch_silent_fixed_name", "last.safetensors", dict(verbose=0)),
    Case("best_val_loss_auto", "best.safetensors", dict(save_best_only=True, verbose=1)),
    Case(
        "best_val_accuracy_auto_is_max",
        "{epoch}.safetensors",
        dict(monitor="val_accuracy", save_best_only=True, verbose=1),
    ),
    Case(
        "best_accuracy_min",
        "{epoch}.safetensors",
        dict(monitor="accuracy", mode="min", save_best_only=True, verbose=1),
    ),
    Case(
        "best_loss_max",
        "{epoch}-{loss:.4f}.safetensors",
        dict(monitor="loss", mode="max", save_best_only=True, verbose=1),
    ),
    Case(
        "best_val_loss_min_silent",
        "{epoch}.safetensors",
        dict(monitor="val_loss", mode="min", save_best_only=True, save_weights_only=True),
    ),
    Case(
        "threshold_val_loss",
        "{epoch}.safetensors",
        dict(save_best_only=True, initial_value_threshold=0.40, verbose=1),
    ),
    Case(
        "threshold_val_accuracy_max",
        "{epoch}.safetensors",
        dict(
            monitor="val_accuracy",
            mode="max",
            save_best_only=True,
            initial_value_threshold=0.9,
            verbose=1,
        ),
    ),
    Case(
        "unknown_mode_warns_and_uses_auto",
        "{epoch}.safetensors",
        dict(mode="sideways", save_best_only=True, verbose=1),
        warns=True,
    ),
    Case(
        "monitor_missing_warns_and_saves",
        "{epoch}.safetensors",
        dict(save_best_only=True, verbose=1),
        validation=False,
        warns=True,
    ),
    Case(
        "monitor_missing_acc_like",
        "{epoch}.safetensors",
        dict(monitor="val_accuracy", save_best_only=True, verbose=1),
        validation=False,
        epochs=2,
        warns=True,
    ),
    Case(
        "save_freq_int",
        "{epoch}-{batch}.safetensors",
        dict(save_freq=4, verbose=1),
        epochs=3,
    ),
    Case(
        "save_freq_int_steps_per_execution",
        "e{epoch:02d}b{batch:02d}-{loss:.3f}.safetensors",
        dict(save_freq=3, verbose=1),
        steps_per_execution=2,
        epochs=3,
    ),
    Case(
        "save_freq_int_steps_per_execution_3",
        "{epoch}-{batch}.safetensors",
        dict(save_freq=5, save_weights_only=True, verbose=1),
        steps_per_execution=3,
        epochs=3,
    ),
    Case(
        "save_freq_one_overwrites",
        "last.safetensors",
        dict(save_freq=1, save_weights_only=True),
        epochs=2,
    ),
    Case(
        "subfolder_created_when_saving",
        "sub/{epoch}/ckpt.safetensors",
        dict(verbose=1),
        epochs=2,
    ),
    # Errors at fit time: the same exception, type and text.
    Case(
        "format_key_missing",
        "{epoch}-{nope}.safetensors",
        dict(verbose=1),
        epochs=1,
        raises=True,
    ),
    Case(
        "auto_mode_cannot_infer",
        "{epoch}.safetensors",
        dict(monitor="val_mystery", verbose=1),
        epochs=1,
        raises=True,
    ),
    Case(
        "auto_mode_cannot_infer_even_without_save_best_only",
        "{epoch}.safetensors",
        dict(monitor="mystery", save_best_only=False),
        epochs=1,
        raises=True,
    ),
]


def params(cases: list[Case]) -> list:
    """The cases as pytest parameters; those with `steps_per_execution` > 1 are for the
    backends that have it (Keras's torch trainer refuses it)."""
    return [
        pytest.param(
            c,
            id=c.id,
            marks=[pytest.mark.backends("tensorflow", "jax")] if c.steps_per_execution > 1 else [],
        )
        for c in cases
    ]


@pytest.mark.parametrize("case", params(CASES))
def test_parity(case, tmp_path):
    theirs, ours = run_both(case, tmp_path)
    assert_parity(case, theirs, ours)


@pytest.mark.parametrize(
    "case",
    params(
        [c for c in CASES if c.id in ("best_val_loss_auto", "save_freq_int_steps_per_execution")]
    ),
)
def test_parity_synchronous_keeps_keras_line_order(case, tmp_path):
    theirs, ours = run_both(case, tmp_path, background=False)
    assert_parity(case, theirs, ours, background=False)


def test_directory_at_the_path_raises_keras_ioerror(tmp_path):
    case = Case("directory", "taken.safetensors", dict(save_weights_only=True), epochs=1)

    def planted(folder, callback_class, filepath, kwargs):
        os.makedirs(os.path.join(folder, filepath))
        return callback_class(os.path.join(folder, filepath), **kwargs)

    theirs = fit_with(
        lambda d: planted(
            d, keras.callbacks.ModelCheckpoint, case.keras_filepath(), case.keras_kwargs()
        ),
        tmp_path,
        "keras",
        epochs=1,
    )
    ours = fit_with(
        lambda d: planted(d, fastckpt.ModelCheckpoint, case.filepath, case.kwargs),
        tmp_path,
        "ours",
        epochs=1,
    )
    assert theirs.error is not None and theirs.error[0] is OSError
    assert ours.error == (theirs.error[0], case.to_ours(theirs.error[1]))


# The other formats: they need fastckpt's `.weights.h5`, `.keras` and legacy `.h5` writers. ---
FORMAT_CASES = [
    Case(
        "weights_h5",
        "{epoch:02d}-{val_loss:.2f}.weights.h5",
        dict(save_weights_only=True, verbose=1),
        epochs=3,
    ),
    Case(
        "weights_h5_best_int_freq",
        "best.weights.h5",
        dict(save_weights_only=True, save_freq=2, monitor="loss", verbose=1),
        steps_per_execution=2,
        epochs=2,
    ),
    Case("keras_zip", "{epoch:02d}-{val_loss:.2f}.keras", dict(verbose=1), epochs=3),
    Case("keras_zip_best", "best.keras", dict(save_best_only=True, verbose=1), epochs=3),
    Case("legacy_h5_full_model", "{epoch}.h5", dict(verbose=1), epochs=2),
    # Keras's quirk: a `.weights.h5` name with save_weights_only=False holds a legacy
    # full-model h5 (model.save picks the format from `.h5`).
    Case("weights_h5_name_full_model_is_legacy_h5", "m{epoch}.weights.h5", dict(), epochs=2),
]


@pytest.mark.parametrize("case", params(FORMAT_CASES))
def test_parity_formats(case, tmp_path):
    theirs, ours = run_both(case, tmp_path)
    assert theirs.files, "Keras saved nothing: the case tests nothing"
    assert_parity(case, theirs, ours)


# Arguments ----------------------------------------------------------------------------------


def test_signature_is_keras_plus_keyword_only_extras():
    theirs = list(inspect.signature(keras.callbacks.ModelCheckpoint).parameters.values())
    ours = list(inspect.signature(fastckpt.ModelCheckpoint).parameters.values())
    assert ours[: len(theirs)] == theirs
    extras = ours[len(theirs) :]
    assert [p.name for p in extras] == [
        "max_to_keep",
        "save_on_background",
        "snapshot_buffers",
        "threads",
        "period",
        "options",
        "compression",
    ]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extras)


BAD_ARGUMENTS = [
    dict(filepath="m.keras", save_freq="batch"),
    dict(filepath="m.keras", save_freq=1.5),
    dict(filepath="m.keras", save_freq=None),
    dict(filepath="w.keras", save_weights_only=True),
    dict(filepath="w.h5", save_weights_only=True),
    dict(filepath="w.weights.json", save_weights_only=True),
    dict(filepath="m.txt"),
    dict(filepath="m.hdf5"),
    dict(filepath="m"),
    dict(filepath="m.keras", load_weights_on_restart=True),
    dict(filepath="m.keras", monitor="val_loss", mode="min", some_option=1),
]


@pytest.mark.parametrize("kwargs", BAD_ARGUMENTS, ids=repr)
def test_bad_arguments_raise_what_keras_raises(kwargs):
    with pytest.raises(Exception) as theirs:
        keras.callbacks.ModelCheckpoint(**kwargs)
    with pytest.raises(Exception) as ours:
        fastckpt.ModelCheckpoint(**kwargs)
    assert type(ours.value) is type(theirs.value)
    # Ours may add one note (that `.safetensors` and `.shards.json` are accepted too), after
    # Keras's text.
    assert str(ours.value) in (
        str(theirs.value),
        str(theirs.value) + fastckpt_callbacks._SAFETENSORS_NOTE,
    )


GOOD_ARGUMENTS = [
    dict(filepath="m.keras", save_freq=True),
    dict(filepath="m.keras", save_freq=0),
    dict(filepath="m.h5"),
    dict(filepath="m.weights.h5"),
    dict(filepath="w.weights.h5", save_weights_only=True),
    dict(filepath="m.keras", mode="max", monitor="anything"),
    dict(filepath=os.path.join("a", "{epoch}", "m.keras"), initial_value_threshold=3),
]


@pytest.mark.parametrize("kwargs", GOOD_ARGUMENTS, ids=repr)
def test_what_keras_accepts_we_accept(kwargs):
    theirs = keras.callbacks.ModelCheckpoint(**kwargs)
    ours = fastckpt.ModelCheckpoint(**kwargs)
    for name in ("filepath", "monitor", "verbose", "save_best_only", "save_weights_only"):
        assert getattr(ours, name) == getattr(theirs, name), name
    for name in ("mode", "save_freq", "best", "min_delta"):
        assert getattr(ours, name) == getattr(theirs, name), name


def test_pathlike_filepath_becomes_a_string(tmp_path):
    path = tmp_path / "m.keras"
    assert fastckpt.ModelCheckpoint(path).filepath == keras.callbacks.ModelCheckpoint(path).filepath


def test_batch_hooks_are_dispatched_synchronously_like_keras():
    def dispatch(callback):
        callbacks = keras.callbacks.CallbackList([callback], model=fresh_model())
        return callbacks._async_train, callbacks._async_test, callbacks._async_predict

    assert dispatch(fastckpt.ModelCheckpoint("m.keras")) == dispatch(
        keras.callbacks.ModelCheckpoint("m.keras")
    )


def test_non_scalar_monitor_warns_and_saves_like_keras(tmp_path):
    """Keras falls back to saving when the monitored value is an array; `fit` never logs
    one, so the hooks are called directly."""

    def drive(callback_class, filepath):
        callback = callback_class(
            str(tmp_path / filepath), save_best_only=True, save_weights_only=True
        )
        callback.set_model(fresh_model())
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            callback.on_train_begin()
            callback.on_epoch_begin(0)
            callback.on_epoch_end(0, logs={"val_loss": np.array([0.5, 0.25])})
            callback.on_train_end()
        return callback_warnings(caught)

    theirs = drive(keras.callbacks.ModelCheckpoint, "k.weights.h5")
    ours = drive(fastckpt.ModelCheckpoint, "o.safetensors")
    assert theirs and ours == theirs
    assert sorted(os.listdir(tmp_path)) == ["k.weights.h5", "o.safetensors"]
