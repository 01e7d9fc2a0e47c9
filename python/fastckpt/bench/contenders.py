"""The ways of writing a checkpoint that the benchmark compares, with one interface.

A `SaveContender` writes a model's checkpoint to a path and returns how long it took to be
durable (fsync'd file and folder; for libraries that do not fsync, the benchmark does it
right after and counts it). A `CallbackContender` makes a Keras callback that saves every N
batches, for the stall figure. Unavailable contenders (`OrbaxCheckpoint` without
`orbax-checkpoint`) stay in the lists with `available=False` and a note, so the report says
why a row is missing.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

import fastckpt
from fastckpt.bench.floors import make_durable

Quantities = dict[str, float]


@dataclasses.dataclass(frozen=True)
class SaveContender:
    """One way to write a checkpoint file.

    Attributes:
        name: as shown in the report.
        suffix: the file name suffix it writes.
        family: "fastckpt", "keras" or "other".
        save: `save(model, path) -> {"seconds": ..., ...}`, timed to durability.
        extra_copies: host memory it takes beyond the model, in checkpoint sizes (fastckpt's
            reused snapshot arena is counted once per model, not here), so that big cases
            can skip what would not fit in this machine's memory.
    """

    name: str
    suffix: str
    family: str
    save: Callable[[keras.Model, str], Quantities]
    available: bool = True
    note: str = ""
    extra_copies: float = 0.0


def _durable_after(write: Callable[[], Any], path: str) -> Quantities:
    start = time.perf_counter()
    write()
    make_durable(path)
    return {"seconds": time.perf_counter() - start}


def fastckpt_save(
    suffix: str, *, threads: int | None = None, background: bool = False, optimizer: bool = True
) -> SaveContender:
    """`fastckpt.save` to a `suffix` file; with `background`, also how long the caller was
    blocked (`blocked`) before it could go on training."""
    label = f"fastckpt {suffix}"
    if threads is not None:
        label += f" threads={threads}"
    if background:
        label += " (background)"

    def save(model: keras.Model, path: str) -> Quantities:
        start = time.perf_counter()
        if not background:
            fastckpt.save(model, path, threads=threads, include_optimizer=optimizer)
            return {"seconds": time.perf_counter() - start}
        job = fastckpt.save(
            model, path, threads=threads, include_optimizer=optimizer, background=True
        )
        blocked = time.perf_counter() - start
        job.result()
        return {"seconds": time.perf_counter() - start, "blocked": blocked}

    return SaveContender(label, suffix, "fastckpt", save)


def keras_save_weights() -> SaveContender:
    def save(model: keras.Model, path: str) -> Quantities:
        return _durable_after(lambda: model.save_weights(path), path)

    return SaveContender(
        "keras model.save_weights",
        ".weights.h5",
        "keras",
        save,
        note="+ fsync by the bench",
        extra_copies=0.1,
    )


def keras_model_save(suffix: str = ".keras") -> SaveContender:
    def save(model: keras.Model, path: str) -> Quantities:
        return _durable_after(lambda: model.save(path), path)

    # `.keras`: Keras builds the whole weights file in memory, then copies it into the zip.
    return SaveContender(
        f"keras model.save({suffix})",
        suffix,
        "keras",
        save,
        note="+ fsync by the bench",
        extra_copies=2.0 if suffix == ".keras" else 0.1,
    )


def safetensors_arrays(model: keras.Model, include_optimizer: bool = True) -> dict[str, Any]:
    """What a user would hand `safetensors.numpy.save_file`: every variable as numpy."""
    variables = list(model.variables)
    if include_optimizer and getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    out: dict[str, np.ndarray] = {}
    for i, v in enumerate(variables):
        name = v.path if v.path not in out else f"{v.path}#{i}"
        out[name] = np.asarray(v.numpy())
    return out


def safetensors_save_file() -> SaveContender:
    available = importlib.util.find_spec("safetensors") is not None

    def save(model: keras.Model, path: str) -> Quantities:
        from safetensors.numpy import save_file

        return _durable_after(lambda: save_file(safetensors_arrays(model), path), path)

    return SaveContender(
        "safetensors.numpy.save_file",
        ".safetensors",
        "other",
        save,
        available=available,
        note="+ fsync by the bench" if available else "safetensors not installed",
        extra_copies=1.0,
    )


def save_contenders(*, legacy_h5: bool = True) -> list[SaveContender]:
    """The save contenders of the throughput and per-variable figures."""
    out = [
        fastckpt_save(".weights.h5"),
        fastckpt_save(".keras"),
        fastckpt_save(".safetensors"),
        fastckpt_save(".weights.h5", background=True),
        keras_save_weights(),
        keras_model_save(".keras"),
        safetensors_save_file(),
    ]
    if legacy_h5:
        out[3:3] = [fastckpt_save(".h5")]
        out.append(keras_model_save(".h5"))
    return out


@dataclasses.dataclass(frozen=True)
class CallbackContender:
    """A callback that saves every `save_freq` batches to `path` (a file, or for Orbax a
    folder). `make(path, save_freq)` returns a fresh callback."""

    name: str
    suffix: str
    family: str
    make: Callable[[str, int], keras.callbacks.Callback]
    available: bool = True
    note: str = ""

    @property
    def label(self) -> str:
        return f"{self.name} {self.suffix}".strip()


def orbax_installed() -> bool:
    try:
        return importlib.util.find_spec("orbax.checkpoint") is not None
    except ModuleNotFoundError:
        return False


def fastckpt_model_checkpoint() -> Any:
    """`fastckpt.ModelCheckpoint` when this build has it (it lands from another branch)."""
    return getattr(fastckpt, "ModelCheckpoint", None)


def callback_contenders(
    suffixes: tuple[str, ...] = (".weights.h5", ".keras", ".safetensors"),
) -> list[CallbackContender]:
    """The stall figure's contenders: Keras's callbacks, and fastckpt's background one for
    each of `suffixes`."""

    def keras_cb(weights_only: bool) -> Callable[[str, int], keras.callbacks.Callback]:
        return lambda path, freq: keras.callbacks.ModelCheckpoint(
            path, save_weights_only=weights_only, save_freq=freq
        )

    def orbax_cb(path: str, freq: int) -> keras.callbacks.Callback:
        # Orbax refuses relative folders.
        return keras.callbacks.OrbaxCheckpoint(
            os.path.abspath(path), save_freq=freq, max_to_keep=1, save_on_background=True
        )

    out = [
        CallbackContender("keras ModelCheckpoint", ".weights.h5", "keras", keras_cb(True)),
        CallbackContender("keras ModelCheckpoint", ".keras", "keras", keras_cb(False)),
        CallbackContender(
            "keras OrbaxCheckpoint",
            "",
            "keras",
            orbax_cb,
            available=orbax_installed(),
            note="" if orbax_installed() else "not installed (pip install orbax-checkpoint)",
        ),
    ]
    ours = fastckpt_model_checkpoint()

    def fastckpt_cb(weights_only: bool) -> Callable[[str, int], keras.callbacks.Callback]:
        return lambda path, freq: ours(
            path, save_weights_only=weights_only, save_freq=freq, save_on_background=True
        )

    for suffix in suffixes:
        out.append(
            CallbackContender(
                "fastckpt ModelCheckpoint (background)",
                suffix,
                "fastckpt",
                fastckpt_cb(suffix != ".keras"),
                available=ours is not None,
                note="" if ours is not None else "fastckpt.ModelCheckpoint is not in this build",
            )
        )
    return out


class TimedCallback(keras.callbacks.Callback):
    """Wraps a callback and adds up the seconds `fit` spends inside its hooks: how long the
    training thread was blocked by it, measured directly rather than as a difference of two
    noisy `fit` times. Keras dispatches batch hooks the same way as for the wrapped
    callback (both override `on_train_batch_end`; `async_safe` is copied)."""

    def __init__(self, inner: keras.callbacks.Callback) -> None:
        super().__init__()
        self.inner = inner
        self.async_safe = getattr(inner, "async_safe", False)
        self.seconds = 0.0  # in every hook
        self.end_seconds = 0.0  # in on_train_end: waiting for the last background save

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def _timed(self, hook: str, *args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            getattr(self.inner, hook)(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start

    def on_train_begin(self, logs=None):
        self._timed("on_train_begin", logs)

    def on_train_end(self, logs=None):
        before = self.seconds
        self._timed("on_train_end", logs)
        self.end_seconds += self.seconds - before

    def on_epoch_begin(self, epoch, logs=None):
        self._timed("on_epoch_begin", epoch, logs)

    def on_epoch_end(self, epoch, logs=None):
        self._timed("on_epoch_end", epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self._timed("on_train_batch_begin", batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        self._timed("on_train_batch_end", batch, logs)
