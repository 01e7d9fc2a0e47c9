"""Stage 1: model -> SavePlan, with Keras's own saving traversal.

Keras walks the model on every save (about 130 us per variable). The walk's result only
changes when the set of variables changes, so fastckpt walks once and reuses the plan until
the model's (and optimizer's) variables are different objects or differ in number.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
import weakref
from collections.abc import Iterator
from typing import Any

import keras
from keras.src.optimizers.base_optimizer import BaseOptimizer
from keras.src.saving import saving_lib

from fastckpt._compat import check_keras_version


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


class _CollectingStore(saving_lib.H5IOStore):
    """Stands where Keras expects an `H5IOStore` (it checks the type since 3.10) and
    records what would be written instead of writing it."""

    def __init__(self) -> None:
        self.groups: list[tuple[str, dict[str, str]]] = []
        self.groups_at: list[int] = []
        self.entries: list[Entry] = []
        self._group = ""
        self._made = False

    def __bool__(self) -> bool:
        return True

    def make(self, path, metadata=None):
        self._group = f"{path}/vars" if path else "vars"
        self._made = bool(metadata)
        if metadata:
            self.groups.append((self._group, {str(k): str(v) for k, v in metadata.items()}))
            self.groups_at.append(len(self.entries))
        return self

    def __setitem__(self, key, value):
        if not self._made:
            self.groups.append((self._group, {}))
            self.groups_at.append(len(self.entries))
            self._made = True
        self.entries.append(Entry(self._group, str(key), value))

    def keys(self):
        return [e.key for e in self.entries if e.group == self._group]

    def __len__(self):
        return len(self.keys())

    def __contains__(self, key):
        return key in self.keys()

    def close(self) -> None:
        pass


def _optimizer(model: keras.Model):
    return getattr(model, "optimizer", None)


def _store_variables(optimizer, store):
    """`BaseOptimizer.save_own_variables`, storing the variables rather than `.numpy()`
    copies of them, so the plan can name them and be reused."""
    for i, variable in enumerate(optimizer.variables):
        store[str(i)] = variable


@contextlib.contextmanager
def _optimizers_store_variables(model: keras.Model) -> Iterator[None]:
    """For the walk only: Keras's optimizers save copies of their variables, which would
    make every plan dynamic. Patch the instances (not the class) that use the stock method."""
    patched = []
    optimizer = _optimizer(model)
    while isinstance(optimizer, BaseOptimizer):
        if type(optimizer).save_own_variables is BaseOptimizer.save_own_variables:
            optimizer.save_own_variables = types.MethodType(_store_variables, optimizer)
            patched.append(optimizer)
        optimizer = getattr(optimizer, "inner_optimizer", None)
    try:
        yield
    finally:
        for optimizer in patched:
            del optimizer.save_own_variables


def fingerprint(model: keras.Model, include_optimizer: bool) -> tuple[int, ...]:
    variables = list(model.variables)
    optimizer = _optimizer(model)
    if include_optimizer and optimizer is not None:
        variables += list(optimizer.variables)
    return (len(variables), *map(id, variables))


def _check_model(model: Any) -> None:
    check_keras_version()
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"fastckpt saves Keras models; got {type(model).__module__}.{type(model).__qualname__}"
        )


def walk(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """Runs Keras's saving traversal over `model` and returns what it would save."""
    _check_model(model)
    if not model.built:
        raise ValueError(
            "You are saving a model that has not yet been built: it has no weights yet. "
            "Build it first by calling it on some data or with `model.build()`."
        )
    store = _CollectingStore()
    visited: set[int] = set()
    optimizer = _optimizer(model)
    if not include_optimizer and optimizer is not None:
        visited.add(id(optimizer))
    with _optimizers_store_variables(model):
        saving_lib._save_state(model, store, None, "", visited)
    dynamic = any(not isinstance(e.source, keras.Variable) for e in store.entries)
    return SavePlan(
        groups=store.groups,
        groups_at=store.groups_at,
        entries=store.entries,
        dynamic=dynamic,
        fingerprint=fingerprint(model, include_optimizer),
        include_optimizer=include_optimizer,
    )


_plans: weakref.WeakKeyDictionary[Any, dict[bool, SavePlan]] = weakref.WeakKeyDictionary()


def plan_for(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """The model's SavePlan: reused while its variables stay the same objects."""
    _check_model(model)
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
