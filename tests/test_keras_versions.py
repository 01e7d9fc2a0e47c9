"""The Keras version this suite runs against is one fastckpt supports, and the differences
between the supported minors are the ones `_keras_private` knows. `make test` runs this
file, with the format and callback tests, once per supported minor (`test-keras-minors`)."""

from __future__ import annotations

import keras

from fastckpt import _keras_private


def test_the_installed_keras_is_supported():
    assert _keras_private.SUPPORTED[0] <= _keras_private.KERAS_VERSION
    assert _keras_private.KERAS_VERSION <= _keras_private.SUPPORTED[1]
    assert _keras_private.KERAS_VERSION == tuple(int(p) for p in keras.__version__.split(".")[:2])
