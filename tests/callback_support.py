"""What the ModelCheckpoint tests share: one tiny deterministic model, a way to run `fit`
capturing what a callback printed, warned, raised and wrote, and readers that compare
checkpoint files through independent oracles (stock Keras, h5py, the `safetensors` package).

Tracing a model's train function costs ~2 s on 2 cores, so each model is built once (with
`keras.utils.set_random_seed`) and every later run restores its initial state (weights and
optimizer variables) instead: with `shuffle=False` that is the same training, bit for bit,
which each parity test checks again by comparing the two runs' histories.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np
import safetensors
import safetensors.numpy

SEED = 1234
BATCH = 8
_rng = np.random.default_rng(0)
X = _rng.normal(size=(48, 4)).astype("float32")
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).astype("int32")
X_VAL, Y_VAL = X[:16] + 0.25, Y[:16]

_models: dict[tuple[int, bool], tuple[keras.Model, list[np.ndarray]]] = {}


def _build(steps_per_execution: int, big: bool) -> keras.Model:
    keras.utils.set_random_seed(SEED)
    # `big` adds a 1024x1024 layer: 4 MiB of weights, 12 MiB with Adam's state, so that a
    # save takes long enough to overlap training.
    hidden = [keras.layers.Dense(1024, activation="relu")] if big else []
    model = keras.Sequential(
        [
            keras.Input((4,)),
            keras.layers.Dense(1024 if big else 8, activation="relu"),
            *hidden,
            keras.layers.BatchNormalization(),
            keras.layers.Dense(2, activation="softmax", name="head"),
        ]
    )
    model.compile(
        optimizer=keras.optimizers.Adam(0.02),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        steps_per_execution=steps_per_execution,
    )
    model.optimizer.build(model.trainable_variables)
    return model


def _state(model: keras.Model) -> list[keras.Variable]:
    return list(model.variables) + list(model.optimizer.variables)


def fresh_model(steps_per_execution: int = 1, big: bool = False) -> keras.Model:
    """The test model in its initial state (built once per set of arguments)."""
    key = (steps_per_execution, big)
    if key not in _models:
        model = _build(steps_per_execution, big)
        _models[key] = (model, [v.numpy() for v in _state(model)])
    model, initial = _models[key]
    for variable, value in zip(_state(model), initial, strict=True):
        variable.assign(value)
    model.stop_training = False
    return model


@dataclasses.dataclass
class Run:
    """What one `fit` with one checkpoint callback did."""

    dir: Path
    callback: Any
    files: list[str]
    lines: list[str]
    warnings: list[tuple[type, str]]
    error: tuple[type, str] | None
    history: dict[str, list[float]]


def fit_with(
    make_callback: Callable[[str], Any],
    workdir: Path,
    keep_as: str,
    *,
    steps_per_execution: int = 1,
    big: bool = False,
    validation: bool = True,
    epochs: int = 3,
    extra_callbacks: tuple = (),
) -> Run:
    """Runs `fit` with `make_callback(folder)` in `workdir/run`, then renames the folder to
    `workdir/keep_as`: two runs see the same paths, so messages compare as text."""
    run_dir = workdir / "run"
    run_dir.mkdir(parents=True)
    out = io.StringIO()
    error = None
    history: dict[str, list[float]] = {}
    callback = None
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(out):
        warnings.simplefilter("always")
        try:
            callback = make_callback(str(run_dir))
            model = fresh_model(steps_per_execution, big)
            fitted = model.fit(
                X,
                Y,
                batch_size=BATCH,
                epochs=epochs,
                validation_data=(X_VAL, Y_VAL) if validation else None,
                shuffle=False,
                verbose=0,
                callbacks=[callback, *extra_callbacks],
            )
            history = fitted.history
        except Exception as e:
            error = (type(e), str(e).replace(str(run_dir), "<dir>"))
        finally:
            # A failed fit leaves ours with work to collect: end it before renaming.
            wait = getattr(callback, "wait_until_finished", None)
            if wait is not None:
                with contextlib.suppress(Exception):
                    wait()
            # The kept files are removed off the training thread once `fit` ends (nothing
            # waits for it): let that finish before the files are listed.
            for thread in threading.enumerate():
                if thread.name == "fastckpt-spares":
                    thread.join()
    final = workdir / keep_as
    os.rename(run_dir, final)
    return Run(
        dir=final,
        callback=callback,
        files=list_files(final),
        lines=[line for line in out.getvalue().split("\n") if line],
        warnings=[(c, m.replace(str(run_dir), "<dir>")) for c, m in callback_warnings(caught)],
        error=error,
        history=history,
    )


def ready_spares(ckpt: Any) -> None:
    """Waits until a fastckpt `ModelCheckpoint` has readied its first save and every file
    it reserved or kept to write into is complete (its next save then finds them ready)."""
    ckpt._ready()
    for kept in ckpt._spares.values():
        for spare in kept:
            if spare.reserving is not None:
                spare.reserving.wait(60)


def callback_warnings(caught: list[warnings.WarningMessage]) -> list[tuple[type, str]]:
    """(category, text) of the warnings, less deprecations: those are about library
    internals (Keras's tensor-to-numpy conversion warns once per variable it saves), not
    about what the callback does."""
    return [
        (w.category, str(w.message))
        for w in caught
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))
    ]


def list_files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


FINISHED = re.compile(
    r"^(Epoch \d+: finished saving model to .+) "
    r"\((\d+ B|\d+\.\d\d [KMGT]iB) in (\d+\.\d\d s|\d+\.\d\d ms)\)$"
)


def strip_size_suffix(lines: list[str]) -> list[str]:
    """Our lines with the `(size in time)` suffix of "finished saving" lines removed; a
    "finished saving" line without the suffix fails."""
    out = []
    for line in lines:
        if "finished saving model to" in line:
            match = FINISHED.match(line)
            assert match, f"no size/time suffix in {line!r}"
            line = match.group(1)
        out.append(line)
    return out


def assert_same_messages(keras_lines: list[str], our_lines: list[str], background: bool) -> None:
    """Ours print Keras's lines (plus the suffix), in Keras's order. In the background a
    "finished saving" line is printed when the save is found done, at a later hook: it may
    come after "did not improve" lines, never after the next save's lines (one save is in
    flight at a time, and a new save first reports the previous one)."""
    ours = strip_size_suffix(our_lines)
    if background:
        ours, keras_lines = _without_dropped_saves(ours, keras_lines)
        ours, keras_lines = _finished_first(ours), _finished_first(keras_lines)
    assert ours == keras_lines


DROPPED = re.compile(r"^Epoch (\d+): the save to (.+) was dropped before its write began: ")


def _without_dropped_saves(ours: list[str], keras_lines: list[str]) -> tuple[list, list]:
    """A background save replaced by the next save to the same file before its write began
    prints that (just before the next save's line) instead of its "finished saving" line
    (how often depends on the machine's speed and the backend): it stands for Keras's line
    of that save, which comes at the same place."""
    # Keras before 3.13 prints no "finished saving" line (nor do ours then).
    prints_finished = any("finished saving model to" in line for line in keras_lines)
    kept = []
    for line in ours:
        match = DROPPED.match(line)
        if match is None:
            kept.append(line)
        elif prints_finished:
            kept.append(f"Epoch {match.group(1)}: finished saving model to {match.group(2)}")
    return kept, keras_lines


def _finished_first(lines: list[str]) -> list[str]:
    """Moves each "finished saving" line up past the "did not improve" lines before it."""
    out: list[str] = []
    for line in lines:
        at = len(out)
        if "finished saving model to" in line:
            while at > 0 and "did not improve" in out[at - 1]:
                at -= 1
        out.insert(at, line)
    return out


# Reading checkpoints through independent oracles ------------------------------------------


def h5_datasets(path: Path | io.BytesIO) -> dict[str, np.ndarray]:
    """Every dataset in an HDF5 file, by path, read with h5py."""
    out: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(visit)
    return out


def safetensors_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file, read with the `safetensors` package."""
    with safetensors.safe_open(str(path), framework="np") as f:
        metadata = f.metadata() or {}
    return safetensors.numpy.load_file(str(path)), metadata


def assert_arrays_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = np.asarray(a[name]), np.asarray(b[name])
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert x.tobytes() == y.tobytes(), f"{name} differs"


def variables_after_load_weights(path: Path) -> dict[str, np.ndarray]:
    """Stock Keras `model.load_weights(path)` into the test model; its variables."""
    model = fresh_model()
    model.load_weights(str(path))
    return {f"{i}:{v.path}": v.numpy() for i, v in enumerate(_state(model))}


def variables_after_load_model(path: Path, compile: bool = True) -> dict[str, np.ndarray]:
    """Stock `keras.saving.load_model(path)`; its variables (and optimizer's, if compiled)."""
    model = keras.saving.load_model(str(path), compile=compile)
    state = list(model.variables)
    if compile and model.optimizer is not None:
        state += list(model.optimizer.variables)
    return {f"{i}:{v.path}": v.numpy() for i, v in enumerate(state)}


def assert_same_checkpoint(keras_file: Path, our_file: Path, *, weights_only: bool) -> None:
    """`our_file` holds exactly what Keras's `keras_file` holds, read by stock tools."""
    if our_file.name.endswith(".safetensors"):
        # Keras cannot write safetensors: compare with its `.weights.h5` of the same save.
        tensors, metadata = safetensors_tensors(our_file)
        assert_arrays_identical(h5_datasets(keras_file), tensors)
        assert ("keras.config" in metadata) == (not weights_only)
    elif weights_only:
        assert_arrays_identical(h5_datasets(keras_file), h5_datasets(our_file))
        assert_arrays_identical(
            variables_after_load_weights(keras_file), variables_after_load_weights(our_file)
        )
    elif our_file.name.endswith(".keras"):
        assert_arrays_identical(
            variables_after_load_model(keras_file), variables_after_load_model(our_file)
        )
    else:
        # Legacy full-model h5 (`.h5`, or `.weights.h5` with save_weights_only=False):
        # Keras 3.15 can load it only with compile=False; h5py sees the optimizer part.
        assert_arrays_identical(h5_datasets(keras_file), h5_datasets(our_file))
        assert_arrays_identical(
            variables_after_load_model(keras_file, compile=False),
            variables_after_load_model(our_file, compile=False),
        )
