"""Stage 1: model -> SavePlan, with Keras's own saving traversal.

Keras walks the model on every save (about 130 us per variable). The walk's result only
changes when the set of variables changes, so fastckpt walks once and reuses the plan until
the model's (and optimizer's) variables are different objects or differ in number.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Any

import keras
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


@dataclasses.dataclass
class SavePlan:
    """What a save writes, in Keras's order.

    Attributes:
        groups: `(path, attrs)` of every `vars` group Keras would create, in creation order.
        entries: the stored values.
        dynamic: some value is not a variable (a layer's custom `save_own_variables`), so the
            plan cannot be reused and is walked again on every save.
        fingerprint: identifies the variables the plan was made from.
    """

    groups: list[tuple[str, dict[str, str]]]
    entries: list[Entry]
    dynamic: bool
    fingerprint: tuple[int, ...]
    include_optimizer: bool


class _CollectingStore(saving_lib.H5IOStore):
    """Stands where Keras expects an `H5IOStore` (it checks the type since 3.10) and
    records what would be written instead of writing it."""

    def __init__(self) -> None:
        # Deliberately skips H5IOStore.__init__: there is no file.
        self.groups: list[tuple[str, dict[str, str]]] = []
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
        return self

    def __setitem__(self, key, value):
        if not self._made:
            self.groups.append((self._group, {}))
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


def fingerprint(model: keras.Model, include_optimizer: bool) -> tuple[int, ...]:
    variables = list(model.variables)
    optimizer = _optimizer(model)
    if include_optimizer and optimizer is not None:
        variables += list(optimizer.variables)
    return (len(variables), *map(id, variables))


def walk(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """Runs Keras's saving traversal over `model` and returns what it would save."""
    check_keras_version()
    if not isinstance(model, keras.Model):
        raise TypeError(
            f"fastckpt saves Keras models; got {type(model).__module__}.{type(model).__qualname__}"
        )
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
    saving_lib._save_state(model, store, None, "", visited)
    dynamic = any(not isinstance(e.source, keras.Variable) for e in store.entries)
    return SavePlan(
        groups=store.groups,
        entries=store.entries,
        dynamic=dynamic,
        fingerprint=fingerprint(model, include_optimizer),
        include_optimizer=include_optimizer,
    )


_plans: weakref.WeakKeyDictionary[Any, dict[bool, SavePlan]] = weakref.WeakKeyDictionary()


def plan_for(model: keras.Model, include_optimizer: bool = True) -> SavePlan:
    """The model's SavePlan: reused while its variables stay the same objects."""
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
