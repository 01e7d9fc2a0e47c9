"""Synchronous saves lend the variables' own buffers (`snapshot(plan, hold=True)`)."""

import keras
import numpy as np
import pytest

import fastckpt
from conftest import assert_same_state
from fastckpt import _snapshot, _walk


def big_model() -> keras.Model:
    """Large enough for the held path (variables of at least LARGE_BYTES), with Adam."""
    model = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512), keras.layers.Dense(4)])
    model.compile(optimizer="adam", loss="mse")
    x = np.random.default_rng(0).normal(size=(8, 512)).astype("float32")
    model.fit(x, x[:, :4], epochs=1, batch_size=8, verbose=0)
    return model


# torch assigns in place, into the very buffers held: a hold is taken there only when no
# step comes before the write ends (test_backends.py shows a background save copies).
@pytest.mark.backends("tensorflow", "jax")
def test_held_views_keep_the_values_of_the_snapshot_when_the_variable_changes():
    model = big_model()
    plan = _walk.plan_for(model)
    kernel = next(i for i, e in enumerate(plan.entries) if e.source is model.layers[0].kernel)
    before = np.array(model.layers[0].kernel.numpy())
    snap = _snapshot.snapshot(plan, hold=True)
    held = snap.arrays[kernel]
    assert held.nbytes >= _snapshot.LARGE_BYTES
    model.layers[0].kernel.assign(before + 1.0)
    model.layers[0].kernel.assign_add(np.ones_like(before))
    assert np.array_equal(held, before)
    assert np.array_equal(model.layers[0].kernel.numpy(), (before + 1.0) + np.ones_like(before))


def test_a_synchronous_save_uses_no_arena_and_is_bit_exact(tmp_path):
    model = big_model()
    fastckpt.save(model, tmp_path / "m.weights.h5")
    assert _snapshot.snapshotter_for(_walk.plan_for(model))._arenas == []
    fresh = big_model()
    fastckpt.load(fresh, tmp_path / "m.weights.h5")
    assert_same_state(model, fresh)
    reloaded = keras.Sequential(
        [keras.Input((512,)), keras.layers.Dense(512), keras.layers.Dense(4)]
    )
    reloaded.load_weights(tmp_path / "m.weights.h5")
    for a, b in zip(model.variables, reloaded.variables, strict=True):
        assert np.array_equal(a.numpy(), b.numpy())


def test_a_background_save_still_copies_into_the_arena(tmp_path):
    model = big_model()
    fastckpt.save(model, tmp_path / "m.weights.h5", background=True).result()
    assert len(_snapshot.snapshotter_for(_walk.plan_for(model))._arenas) == 1
