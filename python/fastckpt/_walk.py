"""Stage 1: model -> SavePlan, with Keras's own saving traversal.

Keras walks the model on every save (about 130 us per variable). The walk's result only
changes when the set of variables changes, so fastckpt walks once and reuses the plan until
the model's (and optimizer's) variables are different objects or differ in number.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from typing import Any

import keras
import numpy as np

from fastckpt import _keras_private


@dataclasses.dataclass(frozen=True)
class Entry:
    """One value the walk stored: `group` is the HDF5 group path (`layers/dense/vars`)."""

    group: str
    key: str
    source: Any  # a keras.Variable, or a plain value (then the plan is dynamic)

    @property
    def path(self) -> str:
        return f"{self.group}/{self.key}"


@dataclasses.dataclass(eq=False)
class SavePlan:
    """What a save writes, in Keras's order.

    Attributes:
        groups: `(path, attrs)` of every `vars` group Keras would create, in creation order.
        groups_at: for each group, how many entries had been stored when it was created
            (the interleaving of groups and values, which sharding needs).
        entries: the stored values.
        dynamic: some value is not a variable (a layer's custom `save_own_variables`), so the
            plan cannot be reused and is walked again on every save.
        fingerprint: identifies the variables the plan was made from.
    """

    groups: list[tuple[str, dict[str, str]]]
    groups_at: list[int]
    entries: list[Entry]
    dynamic: bool
    fingerprint: tuple[int, ...]
    include_optimizer: bool
    # Whether some object saves assets (`.keras` only); None until the first `.keras` save.
    has_assets: bool | None = None
    # The plan's snapshotter (`_snapshot.snapshotter_for`), made with the first snapshot and
    # kept here so that it lives exactly as long as the plan (and the model) does.
    snapshotter: Any = None
    # The payload bytes a save writes (`api.plan_bytes`), once asked for.
    payload_bytes: int | None = None


def _optimizer(model: keras.Model) -> Any:
    return getattr(model, "optimizer", None)


def fingerprint(model: keras.Model, include_optimizer: bool) -> tuple[int, ...]:
    variables = list(model.variables)
    optimizer = _optimizer(model)
    if include_optimizer and optimizer is not None:
        variables += list(optimizer.variables)
    return (len(variables), *map(id, variables))


def _check_model(model: Any) -> None:
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"fastckpt saves Keras models; got {type(model).__module__}.{type(model).__qualname__}"
        )


def walk(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """Runs Keras's saving traversal over `model` and returns what it would save (a model
    not built yet has no layer weights, only the groups and any optimizer state)."""
    _check_model(model)
    groups: list[tuple[str, dict[str, str]]] = []
    groups_at: list[int] = []
    entries: list[Entry] = []

    def record_group(path: str, attrs: dict[str, str]) -> None:
        groups.append((path, attrs))
        groups_at.append(len(entries))

    def record_value(group: str, key: str, value: Any) -> None:
        entries.append(Entry(group, key, value))

    skip: set[int] = set()
    optimizer = _optimizer(model)
    if not include_optimizer and optimizer is not None:
        skip.add(id(optimizer))
    store = _keras_private.CollectingStore(record_group, record_value)
    _keras_private.walk_saveables(model, store, skip)
    dynamic = any(not isinstance(e.source, keras.Variable) for e in entries)
    return SavePlan(
        groups=groups,
        groups_at=groups_at,
        entries=entries,
        dynamic=dynamic,
        fingerprint=fingerprint(model, include_optimizer),
        include_optimizer=include_optimizer,
    )


_plans: weakref.WeakKeyDictionary[Any, dict[bool, SavePlan]] = weakref.WeakKeyDictionary()
# Plans are made on the training thread and on the callbacks' readying thread: one walk
# at a time, so that both get the same plan (and with it the buffers readied for it).
_PLANS_LOCK = threading.RLock()


def plan_for(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """The model's SavePlan: reused while its variables stay the same objects."""
    _check_model(model)
    with _PLANS_LOCK:
        cached = _plans.get(model, {}).get(include_optimizer)
        if (
            cached is not None
            and not cached.dynamic
            and cached.fingerprint == fingerprint(model, include_optimizer)
        ):
            return cached
        plan = walk(model, include_optimizer)
        _plans.setdefault(model, {})[include_optimizer] = plan
        return plan


def sizes_once_built(model: keras.Model, include_optimizer: bool = True) -> list[int] | None:
    """The bytes of each value a save of `model` will hold once its optimizer is built,
    for a model whose optimizer is not built yet (TensorFlow builds it in the first
    training step): the model's variables as they are, and the optimizer's, estimated as
    many copies of every trainable variable as a copy of the optimizer makes for one
    stand-in variable (exact for the optimizers that keep per-element state: Adam, SGD,
    RMSprop, ...; factored state such as Adafactor's is left out). Nothing is allocated
    for the real variables. None when there is nothing to estimate (no optimizer, or a
    built one) or the optimizer cannot be copied."""
    optimizer = _optimizer(model)
    if not include_optimizer or optimizer is None or optimizer.built:
        return None
    try:
        per_variable = _variables_per_trainable(optimizer)
    except Exception:  # a custom optimizer that from_config cannot rebuild, ...
        return None
    trainable = [_nbytes(v) for v in model.trainable_variables]
    return [_nbytes(v) for v in model.variables] + trainable * per_variable


def _variables_per_trainable(optimizer: Any) -> int:
    """Variables of the stand-in's shape that a copy of `optimizer` makes for one stand-in
    (its per-element state: Adam's two moments, a momentum, ...)."""
    copy = type(optimizer).from_config(optimizer.get_config())
    stand_in = keras.Variable(np.zeros(_STAND_IN_SHAPE, "float32"), name="fastckpt_stand_in")
    copy.build([stand_in])
    return sum(tuple(v.shape) == _STAND_IN_SHAPE for v in copy.variables)


# A shape no optimizer's own scalars or factored state (rows, columns) take.
_STAND_IN_SHAPE = (3, 7)


def _nbytes(variable: keras.Variable) -> int:
    from fastckpt.formats import numpy_dtype

    dtype = numpy_dtype(keras.backend.standardize_dtype(variable.dtype))
    return int(np.prod(variable.shape, dtype=np.int64)) * dtype.itemsize
