"""The state of a `fit` that decides what happens next, beyond the model's variables: what
a backup carries so that a resumed run continues exactly where the interrupted one was.

fastckpt's callbacks register with the model they train (`register`), so that a
`BackupAndRestore` in the same `fit` finds them whatever their order in the callback list,
records their state (`Stateful.get_state`) and hands it back on resume (`set_state`).
"""

from __future__ import annotations

import weakref
from typing import Any, Protocol

#: Bumped when what a backup records changes in a way an older reader cannot read.
STATE_VERSION = 1


class Stateful(Protocol):
    """A fastckpt callback whose state a backup records."""

    def state_key(self) -> str:
        """Names the callback across runs of the same script (class and arguments)."""
        ...

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable state, as of the last training step that ended."""
        ...

    def set_state(self, state: dict[str, Any]) -> None:
        """Takes back what `get_state` returned, in a new process."""
        ...

    def pending_jobs(self) -> list[Any]:
        """The background saves not yet durable: a backup commits after them."""
        ...


_registry: weakref.WeakKeyDictionary[Any, list[weakref.ref[Any]]] = weakref.WeakKeyDictionary()


def register(model: Any, callback: Stateful) -> None:
    """Records that `callback` trains `model` (once; weakly: it dies with the callback)."""
    refs = _registry.setdefault(model, [])
    refs[:] = [r for r in refs if r() is not None]
    if not any(r() is callback for r in refs):
        refs.append(weakref.ref(callback))


def registered(model: Any) -> list[Stateful]:
    """The live fastckpt callbacks that registered with `model`, in registration order."""
    return [c for c in (r() for r in _registry.get(model, [])) if c is not None]


def keyed(callbacks: list[Stateful]) -> dict[str, Stateful]:
    """The callbacks by a key unique among them: `state_key()`, with `#2`, `#3`, ... for
    repeats (two callbacks with the same arguments are told apart by their order)."""
    out: dict[str, Stateful] = {}
    for callback in callbacks:
        key, n = callback.state_key(), 1
        while (key if n == 1 else f"{key}#{n}") in out:
            n += 1
        out[key if n == 1 else f"{key}#{n}"] = callback
    return out
