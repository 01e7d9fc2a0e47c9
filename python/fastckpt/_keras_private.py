"""Every private Keras and TensorFlow API fastckpt touches, and the versions it knows.

fastckpt reuses Keras's own saving traversal (`keras.src.saving.saving_lib`) so that names
and order match Keras's files exactly, copies `ModelCheckpoint`'s decisions from Keras's
own callback, and reads and assigns TensorFlow variables through its fast-path ops. None
of that is public API: it changes between minor releases. This module is the one place
that imports it, and where the differences between the supported minors are handled; a
Keras outside `SUPPORTED` is refused with a message saying what to install.

Importing this module imports Keras (and the backend Keras is set to use); nothing else in
fastckpt that can run without Keras (`inspect`, `verify`, the readers) imports it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras
from keras.src.backend.common import global_state
from keras.src.callbacks.monitor_callback import MonitorCallback
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.saving import saving_lib
from keras.src.utils import file_utils, io_utils

# The minors fastckpt is tested against, oldest and newest (the suite runs on each).
SUPPORTED = ((3, 12), (3, 15))
SUPPORTED_TEXT = "keras>=3.12,<3.16"


def keras_version(version: str | None = None) -> tuple[int, int]:
    major, minor = (version or keras.__version__).split(".")[:2]
    return int(major), int(minor)


def check_keras_version(version: str | None = None) -> None:
    """Raises ImportError naming the supported range when Keras is outside it."""
    installed = version or keras.__version__
    if not (SUPPORTED[0] <= keras_version(installed) <= SUPPORTED[1]):
        raise ImportError(
            f"fastckpt supports {SUPPORTED_TEXT}, but keras {installed} is installed. "
            f"Install a supported version: pip install '{SUPPORTED_TEXT}'"
        )


check_keras_version()

KERAS_VERSION = keras_version()

# Callbacks ---------------------------------------------------------------------------------

#: Keras's base of monitoring callbacks (`best`, `monitor_op`, `_is_improvement`).
MonitorCallbackBase = MonitorCallback
path_to_string = file_utils.path_to_string
file_exists = file_utils.exists
makedirs = file_utils.makedirs
print_msg = io_utils.print_msg

# Keras 3.13 added the line ModelCheckpoint prints once a save is done (with verbose).
PRINTS_FINISHED_SAVING = KERAS_VERSION >= (3, 13)
# Keras 3.14 fixed the first batch hook's count under `steps_per_execution > 1` (tf-keras
# #255): its `_last_batch_seen` starts at None; before, at 0 (one batch counted too few).
INITIAL_LAST_BATCH_SEEN: int | None = None if KERAS_VERSION >= (3, 14) else 0

# The saving traversal ---------------------------------------------------------------------


class CollectingStore(saving_lib.H5IOStore):
    """Stands where Keras expects an `H5IOStore` (it checks the type since 3.10) and hands
    each `vars` group and value to `record_group(path, attrs)` / `record_value(group, key,
    value)` instead of writing them."""

    def __init__(
        self,
        record_group: Callable[[str, dict[str, str]], None],
        record_value: Callable[[str, str, Any], None],
    ) -> None:
        self._record_group = record_group
        self._record_value = record_value
        self._group = ""
        self._made = False
        self._keys: dict[str, list[str]] = {}

    def __bool__(self) -> bool:
        return True

    def make(self, path: str, metadata: dict[str, Any] | None = None) -> CollectingStore:
        self._group = f"{path}/vars" if path else "vars"
        self._made = bool(metadata)
        if metadata:
            self._record_group(self._group, {str(k): str(v) for k, v in metadata.items()})
        return self

    def __setitem__(self, key: str, value: Any) -> None:
        if not self._made:
            self._record_group(self._group, {})
            self._made = True
        self._keys.setdefault(self._group, []).append(str(key))
        self._record_value(self._group, str(key), value)

    def keys(self) -> list[str]:
        return list(self._keys.get(self._group, []))

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def close(self) -> None:
        pass


def walk_saveables(model: keras.Model, store: CollectingStore, skip: set[int]) -> None:
    """Runs Keras's saving traversal over `model` into `store`; objects whose `id` is in
    `skip` (and what only they reach) are left out."""
    with _optimizers_store_variables(model), _attribute_skipsets_cached():
        saving_lib._save_state(model, store, None, "", set(skip))


_SKIPSET_STORED = "saving_attr_skipset_"
_SKIPSET_LOOKED_UP = "saving_attr_skiplist_"
# One walk at a time swaps Keras's lookup (see `_attribute_skipsets_cached`).
_WALK_LOCK = threading.Lock()


@contextlib.contextmanager
def _attribute_skipsets_cached() -> Iterator[None]:
    """For the walk only: Keras's traversal asks `get_attr_skipset` which attributes of each
    object it visits to skip, which it finds by building a reference object of the type (a
    `Layer`, an `Optimizer` and its variables), then caches under a key it never looks up
    (it stores `saving_attr_skipset_<type>` and reads `saving_attr_skiplist_<type>`, Keras
    3.12-3.15): every object of every walk builds one, three quarters of a walk's time.
    During the walk the key it reads holds each answer as soon as it has one (the same
    sets), so a type's reference object is built once, by the thread's first walk;
    afterwards Keras's state and module are as they were (the state is per thread, and
    the lookup is swapped under a lock)."""
    state = vars(global_state.GLOBAL_STATE_TRACKER)
    added: list[str] = []
    # What earlier walks of this thread found (Keras keeps it, under the other key).
    for key, skipset in list(state.items()):
        if key.startswith(_SKIPSET_STORED) and skipset is not None:
            looked_up = _SKIPSET_LOOKED_UP + key[len(_SKIPSET_STORED) :]
            if looked_up not in state:
                state[looked_up] = skipset
                added.append(looked_up)
    keras_lookup = saving_lib.get_attr_skipset

    def lookup(obj_type: str) -> Any:
        skipset = keras_lookup(obj_type)
        key = _SKIPSET_LOOKED_UP + obj_type
        if key not in state and vars(global_state.GLOBAL_STATE_TRACKER) is state:
            state[key] = skipset
            added.append(key)
        return skipset

    with _WALK_LOCK:
        saving_lib.get_attr_skipset = lookup
        try:
            yield
        finally:
            saving_lib.get_attr_skipset = keras_lookup
            for key in added:
                state.pop(key, None)


def _store_variables(optimizer: Any, store: Any) -> None:
    """`BaseOptimizer.save_own_variables`, storing the variables rather than `.numpy()`
    copies of them, so the plan can name them and be reused."""
    for i, variable in enumerate(optimizer.variables):
        store[str(i)] = variable


@contextlib.contextmanager
def _optimizers_store_variables(model: keras.Model) -> Iterator[None]:
    """For the walk only: Keras's optimizers save copies of their variables, which would
    make every plan dynamic. Patch the instances (not the class) that use the stock method."""
    patched = []
    stack = [getattr(model, "optimizer", None)]
    while stack:
        optimizer = stack.pop()
        if not isinstance(optimizer, BaseOptimizer):
            continue
        if type(optimizer).save_own_variables is BaseOptimizer.save_own_variables:
            optimizer.save_own_variables = _bound(_store_variables, optimizer)
            patched.append(optimizer)
        # LossScaleOptimizer's inner one; MultiOptimizer's (Keras 3.15) several.
        stack.append(getattr(optimizer, "inner_optimizer", None))
        stack.extend(getattr(optimizer, "_inner_optimizers", None) or ())
    try:
        yield
    finally:
        for optimizer in patched:
            del optimizer.save_own_variables


def _bound(fn: Callable[..., Any], obj: Any) -> Any:
    import types

    return types.MethodType(fn, obj)


# Keras's warnings and errors for a model with no weights yet (`saving_lib.save_model`,
# `saving_lib.save_weights_only`), word for word.
UNBUILT_SAVE_WARNING = (
    "You are saving a model that has not yet been built. "
    "It might not contain any weights yet. "
    "Consider building the model first by calling it "
    "on some data."
)
UNBUILT_WEIGHTS_ERROR = (
    "You are saving a model that has not yet been built. "
    "Try building the model first by calling it on some data or "
    "by using `build()`."
)


def model_json(model: keras.Model) -> tuple[str, str]:
    """`(config.json, metadata.json)` of a `.keras` file, as Keras writes them."""
    config_json, metadata_json = saving_lib._serialize_model_as_json(model)
    return str(config_json), str(metadata_json)


class _NoWeights(saving_lib.H5IOStore):
    """Stores nothing: the weights store of a walk for assets only. Keras 3.12.0-3.12.2 and
    3.13 refuse `weights_store=None`; every version skips a store that is false."""

    def __init__(self) -> None:
        pass

    def __bool__(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _AssetStore(saving_lib.DiskIOStore):
    """Keras's asset store, noting whether any object asked for a folder."""

    asked = False

    def make(self, path: str) -> Any:
        self.asked = True
        return super().make(path)


def model_assets(model: keras.Model) -> tuple[list[tuple[str, bytes]], bool]:
    """The `assets/...` members of a `.keras` file, as Keras writes them, and whether any
    object asked for an assets folder at all."""
    store = _AssetStore("assets", mode="w")
    try:
        with _attribute_skipsets_cached():
            saving_lib._save_state(model, _NoWeights(), store, "", set())
        files = []
        for root, _, names in os.walk(store.working_dir):
            for name in sorted(names):
                full = os.path.join(root, name)
                rel = os.path.relpath(full, store.working_dir).replace(os.sep, "/")
                with open(full, "rb") as f:
                    files.append((f"assets/{rel}", f.read()))
        return sorted(files), store.asked
    finally:
        store.close()


def readable_memory_size(nbytes: float) -> str:
    """Keras's way of writing a size in its sharding error messages."""
    return str(saving_lib.readable_memory_size(nbytes))


# Loading through Keras ----------------------------------------------------------------------


class _ServingStore(saving_lib.H5IOStore):
    """Serves already-read arrays to Keras's own `_load_state`, for models whose layers
    load their state themselves (custom `load_own_variables`)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values
        self._group = "vars"

    def __bool__(self) -> bool:
        return True

    def get(self, path: str) -> _ServingStore:
        self._group = f"{path}/vars" if path else "vars"
        return self

    def has_path(self, path: str) -> bool:
        return any(k.startswith(f"{path}/") for k in self._values)

    def keys(self) -> list[str]:
        prefix = f"{self._group}/"
        return [
            k[len(prefix) :]
            for k in self._values
            if k.startswith(prefix) and "/" not in k[len(prefix) :]
        ]

    def __len__(self) -> int:
        return len(self.keys())

    def __contains__(self, key: object) -> bool:
        return f"{self._group}/{key}" in self._values

    def __getitem__(self, key: str) -> Any:
        return self._values[f"{self._group}/{key}"]

    def close(self) -> None:
        pass


def load_state(model: keras.Model, values: dict[str, Any]) -> None:
    """Runs Keras's own loading traversal over `model`, serving `values` by weight path."""
    failed: set[int] = set()
    errors: dict[int, Any] = {}
    saving_lib._load_state(
        model,
        weights_store=_ServingStore(values),
        assets_store=None,
        inner_path="",
        skip_mismatch=False,
        visited_saveables=set(),
        failed_saveables=failed,
        error_msgs=errors,
    )
    if failed:
        saving_lib._raise_loading_failure(errors)


def model_from_config(
    config: str, compile: bool, safe_mode: bool, custom_objects: dict[str, Any] | None = None
) -> keras.Model:
    """Keras's rebuild of a model from a `.keras` file's `config.json` text."""
    return saving_lib._model_from_config(config, custom_objects, compile, safe_mode)


class _Claim:
    """Stands for one of a file's values during a dry run of Keras's loading traversal."""

    __slots__ = ("name", "shape")

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


# The dry run swaps `Variable.assign` process-wide (the swap passes every other value
# through unchanged, so other threads are unaffected); dry runs take turns.
_DRY_RUN = threading.Lock()


def keras_load_targets(model: keras.Model, shapes: dict[str, tuple[int, ...]]) -> dict[int, str]:
    """Which of a file's values Keras's own loading (`saving_lib._load_state`) assigns to
    each variable, by the variable's `id`, found by a dry run that assigns nothing.

    Keras tries an object at every path the traversal reaches it by, until one loads: a
    layer that a property aliases under another attribute name, or whose first attribute
    name changed since the file was written, loads from the path the file has. `shapes`
    are the file's values by weight path. Raises Keras's loading error when Keras's own
    loading would fail too.
    """
    from keras.src.backend.common.variables import Variable

    claimed: dict[int, str] = {}
    real_assign = Variable.assign

    def assign(variable: Any, value: Any) -> Any:
        if not isinstance(value, _Claim):
            return real_assign(variable, value)
        if tuple(value.shape) != tuple(variable.shape):
            raise ValueError(
                "The shape of the target variable and the shape of the target value in "
                "`variable.assign(value)` must match. "
                f"variable.shape={variable.shape}, Received: value.shape={value.shape}."
            )
        claimed[id(variable)] = value.name
        return value

    claims = {name: _Claim(name, shape) for name, shape in shapes.items()}
    with _DRY_RUN, warnings.catch_warnings():
        # An optimizer whose state does not fit warns and keeps its own: not news here.
        warnings.simplefilter("ignore")
        Variable.assign = assign
        try:
            load_state(model, claims)
        finally:
            Variable.assign = real_assign
    return claimed


# The legacy full-model `.h5` ---------------------------------------------------------------


# Keras's legacy saver reads every value with `backend.convert_to_numpy`; while fastckpt
# records a file with it, its module's `backend` is swapped for one whose conversion hands
# out the snapshot's arrays instead. The swap is process-wide, so recordings take turns.
_LEGACY_SWAP = threading.Lock()


class _BackendServingValues:
    """Keras's backend module, but `convert_to_numpy` is `convert`."""

    def __init__(self, real: Any, convert: Callable[[Any], Any]) -> None:
        self._real = real
        self.convert_to_numpy = convert

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def record_legacy_h5(
    model: keras.Model,
    include_optimizer: bool,
    root: Any,
    value_of: Callable[[Any], Any] | None = None,
) -> None:
    """Runs Keras's legacy HDF5 saver (`legacy_h5_format.save_model_to_hdf5`) against
    `root`, an object standing in for an `h5py.File` (see `formats.legacy_h5`). With
    `value_of`, the saver gets each variable's value from it (the snapshot) instead of
    reading the variable again."""
    from keras.src.legacy.saving import legacy_h5_format, saving_options, saving_utils
    from keras.src.legacy.saving.json_utils import get_json_type

    # Keras's `model_metadata` pops "optimizer" out of the model's own compile config: put
    # back, or the model's next `.keras` file would be compiled with the default optimizer.
    compile_config = getattr(getattr(model, "_compile_config", None), "config", None)
    kept = dict(compile_config) if isinstance(compile_config, dict) else None
    with _LEGACY_SWAP:
        real = legacy_h5_format.backend
        if value_of is not None:
            legacy_h5_format.backend = _BackendServingValues(real, value_of)
        try:
            with saving_options.keras_option_scope(use_legacy_config=True):
                for k, v in saving_utils.model_metadata(model, include_optimizer).items():
                    if isinstance(v, (dict, list, tuple)):
                        root.attrs[k] = json.dumps(v, default=get_json_type).encode("utf8")
                    else:
                        root.attrs[k] = v
                group = root.create_group("model_weights")
                legacy_h5_format.save_weights_to_hdf5_group(group, model)
                if include_optimizer and hasattr(model, "optimizer"):
                    legacy_h5_format.save_optimizer_weights_to_hdf5_group(root, model.optimizer)
        finally:
            legacy_h5_format.backend = real
            if kept is not None and isinstance(compile_config, dict):
                compile_config.clear()
                compile_config.update(kept)


def load_legacy_h5(model: keras.Model, f: Any) -> None:
    """Keras's legacy loader: layer by layer, by order; then the optimizer state when the
    file and the model both have one."""
    from keras.src.legacy.saving import legacy_h5_format

    legacy_h5_format.load_weights_from_hdf5_group(f["model_weights"], model)
    optimizer = getattr(model, "optimizer", None)
    if "optimizer_weights" in f and optimizer is not None:
        if not optimizer.built:
            optimizer.build(model.trainable_variables)
        optimizer.set_weights(legacy_h5_format.load_optimizer_weights_from_hdf5_group(f))


# TensorFlow's fast paths --------------------------------------------------------------------


def tf_read_variable_op() -> Callable[[Any, Any], Any]:
    """TensorFlow's eager `ReadVariableOp` (~14 us a variable, against ~160 us for Keras's
    `convert_to_numpy`)."""
    from tensorflow.python.ops import gen_resource_variable_ops

    op: Callable[[Any, Any], Any] = gen_resource_variable_ops.read_variable_op
    return op


def tf_assign_variable_op() -> Callable[[Any, Any], Any]:
    """TensorFlow's eager `AssignVariableOp` (~27 us a variable, against ~230 us for
    `Variable.assign`)."""
    from tensorflow.python.ops import gen_resource_variable_ops

    op: Callable[[Any, Any], Any] = gen_resource_variable_ops.assign_variable_op
    return op


# Resuming a fit inside an epoch ---------------------------------------------------------------


def seed_states(model: keras.Model, create_global: bool = False) -> list[tuple[str, Any]]:
    """The state of every `SeedGenerator` whose draws decide what training does next, by
    a name that stays the same across processes: each layer's (in the model's layer order;
    Keras's weight files leave them out) and the global one that unseeded `keras.random`
    calls use (`create_global` makes it if no call has yet, to restore into)."""
    from keras.src.backend.common import global_state
    from keras.src.random import seed_generator

    states = []
    for i, layer in enumerate(model._flatten_layers(include_self=True, recursive=True)):
        for j, generator in enumerate(getattr(layer, "_seed_generators", ())):
            states.append((f"{i}/{layer.name}/{j}", generator.state))
    generator = global_state.get_global_attribute("global_seed_generator")
    if generator is None and create_global:
        generator = seed_generator.global_seed_generator()
    if generator is not None:
        states.append(("global", generator.state))
    return states


def set_initial_epoch(model: keras.Model, epoch: int) -> None:
    """Makes the next `fit` start at `epoch` (0-based), as Keras's own BackupAndRestore
    does (`fit` reads `model._initial_epoch`)."""
    model._initial_epoch = epoch


def skip_steps_of_next_epoch(
    steps: int, on_skip: Callable[[Any], None], on_refuse: Callable[[str], None]
) -> None:
    """Makes the next epoch of training go past its first `steps` steps without training
    them: their batches are drawn from the data and dropped, so the data continues where an
    interrupted run stopped, and the hooks see the steps that remain, numbered as they were.

    Keras has no way to start an epoch mid-way; this patches, for one epoch only, the
    generator of steps every backend's `EpochIterator` runs (`_enumerate_iterator`, the
    same in Keras 3.12 to 3.15). The batches drawn are the ones the interrupted run trained
    when each epoch is one pass over data in a fixed order (arrays, a `PyDataset`, a finite
    `tf.data` pipeline without an unseeded shuffle). When the data is shuffled (arrays or a
    `PyDataset` with `shuffle=True`) or `steps_per_epoch` makes epochs share one pass, they
    are not known: it calls `on_refuse(reason)` and the epoch starts from its first step,
    as Keras resumes. Else it calls `on_skip(batch)`, with the last batch dropped, just
    before the first remaining step."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    original = EpochIterator._enumerate_iterator

    def enumerate_skipping(self: Any) -> Iterator[Any]:
        EpochIterator._enumerate_iterator = original  # one epoch only
        reason = _unskippable(self)
        if reason is not None:
            on_refuse(reason)
            yield from original(self)
            return
        skipping, batch = True, None
        for begin, end, iterator in original(self):
            if begin < steps:
                for _ in range(end - begin + 1):
                    batch = next(iterator)  # dropped, as the interrupted run trained it
                continue
            if skipping:
                skipping = False
                on_skip(batch)
            yield begin, end, iterator

    enumerate_skipping.__wrapped_original__ = original  # type: ignore[attr-defined]
    EpochIterator._enumerate_iterator = enumerate_skipping


def build_compiled_metrics(model: keras.Model, batch: Any) -> None:
    """Creates the variables of the metrics and losses `compile` asked for, from the
    shapes of a batch of the training data, if the first training step has not yet: so
    that their accumulators can be set before that step (TensorFlow without a
    distribution strategy otherwise creates them while tracing it; `fit` does this on
    the other backends)."""
    model._symbolic_build(data_batch=batch)


def _unskippable(iterator: Any) -> str | None:
    """Why the first steps of this epoch cannot be told from the data, if they cannot."""
    adapter = iterator.data_adapter
    # Arrays keep the flag as `_shuffle` (True or "batch"), `PyDataset`s as `shuffle`.
    if getattr(adapter, "_shuffle", False) or getattr(adapter, "shuffle", False) is True:
        return "the data is shuffled, so the batches already trained are not known"
    batches = iterator._num_batches
    if iterator.steps_per_epoch and iterator.steps_per_epoch != batches:
        # Epochs then share one pass over the data, which a new process starts afresh.
        return (
            f"steps_per_epoch={iterator.steps_per_epoch} is not one pass over the data "
            f"({batches} batches)"
        )
    return None


def cancel_step_skipping() -> None:
    """Undoes `skip_steps_of_next_epoch` if its epoch never came (a `fit` that failed)."""
    from keras.src.trainers.epoch_iterator import EpochIterator

    patched = EpochIterator.__dict__.get("_enumerate_iterator")
    original = getattr(patched, "__wrapped_original__", None)
    if original is not None:
        EpochIterator._enumerate_iterator = original


class RunningFit:
    """The `fit` that calls a callback's `on_train_begin`, to tell later, from a signal
    handler's frame, whether that `fit` still runs (a `fit` that raises never calls
    `on_train_end`): the nearest frame above named `fit` (every backend's trainer method,
    3.12 to 3.15, which calls the callbacks' hooks through a `CallbackList`)."""

    def __init__(self) -> None:
        frame: types.FrameType | None = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != "fit":
            frame = frame.f_back
        self._code = None if frame is None else frame.f_code

    @property
    def found(self) -> bool:
        return self._code is not None

    def is_running(self, frame: types.FrameType | None) -> bool:
        """Whether the `fit` is on the stack of `frame` (the main thread's, in a handler)."""
        while frame is not None:
            if frame.f_code is self._code:
                return True
            frame = frame.f_back
        return False
