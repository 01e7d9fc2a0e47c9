"""The Keras version this suite runs against is one fastckpt supports, and the differences
between the supported minors are the ones `_keras_private` knows. `make test` runs this
file, with the format and callback tests, once per supported minor (`test-keras-minors`)."""

from __future__ import annotations

import keras

from fastckpt import _keras_private


def layers_built(monkeypatch) -> list[type]:
    """The type of every Keras `Layer` constructed from now on (the list grows)."""
    from keras.src.layers.layer import Layer

    built: list[type] = []
    real_init = Layer.__init__

    def init(self, *args, **kwargs):
        built.append(type(self))
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(Layer, "__init__", init)
    return built


def test_the_installed_keras_is_supported():
    assert _keras_private.SUPPORTED[0] <= _keras_private.KERAS_VERSION
    assert _keras_private.KERAS_VERSION <= _keras_private.SUPPORTED[1]
    assert _keras_private.KERAS_VERSION == tuple(int(p) for p in keras.__version__.split(".")[:2])


def _walkable_model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((4,)), keras.layers.Dense(3), keras.layers.BatchNormalization()]
    )
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_walk_builds_no_reference_objects_once_keras_knows_what_to_skip(monkeypatch):
    """Keras's traversal finds the attributes to skip by building a reference `Layer` (or
    `Optimizer`, ...) and caches the answer under a key it never reads: fastckpt's walk
    makes the key it reads hold the answer, so only a first walk builds them. The plan
    is the same either way."""
    from fastckpt import _walk

    model = _walkable_model()
    first = _walk.walk(model)
    built = layers_built(monkeypatch)
    again = _walk.walk(model)
    assert built == [], built
    assert [(e.path, id(e.source)) for e in again.entries] == [
        (e.path, id(e.source)) for e in first.entries
    ]
    assert again.groups == first.groups


def test_a_first_walk_builds_one_reference_object_a_type(monkeypatch):
    """A thread's first walk (Keras's state is per thread: a new thread has none) builds a
    reference object once for each kind of object it visits, not once for every object:
    here one for the `Sequential` and one for all six of its layers."""
    import threading

    from keras.src.layers.layer import Layer

    from fastckpt import _walk

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), *[keras.layers.Dense(3) for _ in range(6)]])
    built = layers_built(monkeypatch)
    walker = threading.Thread(target=_walk.walk, args=(model,))
    walker.start()
    walker.join()
    assert built == [Layer, Layer], built


def test_a_walk_leaves_kerass_state_as_it_was():
    """What the walk puts in Keras's per-thread state for its traversal is gone after it."""
    from keras.src.backend.common import global_state

    from fastckpt import _walk

    model = _walkable_model()
    _walk.walk(model)  # Keras's own traversal stores what it stores
    before = dict(vars(global_state.GLOBAL_STATE_TRACKER))
    _walk.walk(model)
    assert dict(vars(global_state.GLOBAL_STATE_TRACKER)) == before
