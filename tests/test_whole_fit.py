"""What keeps checkpointing off training's critical path over a whole `fit` (README,
"Training while a checkpoint is written"): snapshot buffers ready before the first save,
queued saves and dropped superseded ones (for the same file only), bounded host memory,
the last checkpoint written from the variables' own buffers, and the file a save replaced
kept and written into by the next save of that file.

What a file must hold is checked against stock Keras (`save_weights` at the same step, read
with h5py / the `safetensors` package); the mechanisms are watched from outside, through
fastckpt's own objects only where no other view exists (which buffer a snapshot used).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import textwrap
import threading
import time
import warnings
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import fastckpt
from callback_support import BATCH, X, Y, assert_arrays_identical, fresh_model, h5_datasets
from fastckpt import _fastckpt, _keras_private, _snapshot, _walk, api
from fastckpt import callbacks as fastckpt_callbacks
from fastckpt._fastckpt import testing
from test_callback_background import KerasOracle, assert_holds


def temp_files(folder: Path) -> list[str]:
    return sorted(n for n in os.listdir(folder) if _fastckpt.is_temp_name(n))


def wait_for_no_temp_files(folder: Path, timeout: float = 10.0) -> list[str]:
    """Kept files are removed on a background thread once training ends."""
    deadline = time.monotonic() + timeout
    while temp_files(folder) and time.monotonic() < deadline:
        time.sleep(0.02)
    return temp_files(folder)


def fit(callbacks, *, epochs=2, big=True, model=None):
    model = model if model is not None else fresh_model(big=big)
    model.fit(X, Y, batch_size=BATCH, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks)
    return model


@contextlib.contextmanager
def slow_writes(ms: int):
    """Every payload write of every save sleeps `ms` first: saves overlap training."""
    testing.inject_delay(ms)
    try:
        yield
    finally:
        testing.inject_delay(0)


def plan_of(model: keras.Model) -> _walk.SavePlan:
    """The plan fastckpt cached for `model` (without walking it again)."""
    return _walk._plans[model][True]


def plan_of_saved(model: keras.Model) -> _walk.SavePlan:
    """The plan of a save of `model` (walked if it was not yet)."""
    return _walk.plan_for(model)


def h5_saved(model: keras.Model, folder: Path) -> dict[str, np.ndarray]:
    """What Keras's own `save_weights` writes for `model` now."""
    model.save_weights(folder / "keras.weights.h5")
    try:
        return h5_datasets(folder / "keras.weights.h5")
    finally:
        os.remove(folder / "keras.weights.h5")


# Ready before the first save ---------------------------------------------------------------


def unbuilt_model() -> keras.Model:
    """A new model whose optimizer TensorFlow builds in the first training step."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(512), keras.layers.Dense(512)])
    model.compile(optimizer="adam", loss="mse")
    assert not model.optimizer.built
    return model


def fit_unbuilt(model, callbacks, epochs=2):
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.zeros((16, 512), "float32")
    model.fit(x, y, epochs=epochs, batch_size=8, verbose=0, callbacks=callbacks)


# JAX and torch build the optimizer before training begins.
@pytest.mark.backends("tensorflow")
def test_memory_for_the_first_save_is_readied_while_the_first_step_builds_the_optimizer(
    tmp_path,
):
    """The callback leaves the optimizer to the first step (building it when training
    begins would only move the step's cost into the hook) and readies memory of the size
    the save is expected to need meanwhile; after the step the save is planned, with the
    optimizer's slots, and its snapshot buffer is that memory, faulted in: the first save
    allocates nothing."""
    model = unbuilt_model()
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "c.weights.h5"), save_weights_only=True)
    seen = {}

    class Before(keras.callbacks.Callback):  # placed before `ckpt`
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 0 and "built" not in seen:
                seen["built"] = self.model.optimizer.built
                ckpt._readying.wait()  # readied on the readying thread meanwhile
                seen["warm"] = list(ckpt._readying.warm)

        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["plan"] = plan_of(self.model)
                seen["arenas"] = list(_snapshot.snapshotter_for(seen["plan"])._arenas)
                seen["ready"] = [a.prefault.wait(30) for a in seen["arenas"]]

    class After(keras.callbacks.Callback):  # placed after `ckpt`
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["first save plan"] = plan_of(self.model)
                seen["lent to"] = seen["arenas"][0].job

    oracle = KerasOracle(tmp_path / "oracle")
    fit_unbuilt(model, [Before(), ckpt, After(), oracle])
    assert seen["built"] is False, "the callback built the optimizer itself"
    [warm] = seen["warm"]
    [arena] = seen["arenas"]
    assert seen["ready"] == [True]
    assert np.shares_memory(arena.block, warm.host.array), "the first save got new memory"
    names = [e.path for e in seen["plan"].entries]
    assert any(n.startswith("optimizer/") for n in names), "the optimizer's slots are planned"
    assert seen["first save plan"] is seen["plan"], "the first save walked the model again"
    assert seen["lent to"] is not None and not isinstance(seen["lent to"], _snapshot._Reserved)
    assert_arrays_identical(oracle.values("e2"), h5_datasets(tmp_path / "c.weights.h5"))


class ThreadsOf:
    """Records the thread of every call of `owner.name` (patched with `monkeypatch`); with
    `fail_off_main`, a call on another thread than the main one raises instead."""

    def __init__(self, monkeypatch, owner, name, fail_off_main=False):
        self.threads: list[threading.Thread] = []
        real = getattr(owner, name)

        def recorded(*args, **kwargs):
            self.threads.append(threading.current_thread())
            if fail_off_main and threading.current_thread() is not threading.main_thread():
                raise RuntimeError("readying failed")
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, recorded)

    def on_main(self) -> list[bool]:
        return [t is threading.main_thread() for t in self.threads]


def test_the_first_save_is_readied_off_the_training_thread(tmp_path, monkeypatch):
    """What the first save needs (Keras's traversal of the model, the snapshot buffer and
    its memory, the file it writes into) is made while training runs, on a thread of
    fastckpt's own: no hook walks the model or makes a buffer on the training thread (under
    JAX the values the buffer needs are read there), and the first save copies into the
    buffer readied for it, its memory faulted in, and writes into the file reserved."""
    model = fresh_model(big=True)
    _walk._plans.pop(model, None)  # not walked yet in this process
    walks = ThreadsOf(monkeypatch, _walk, "walk")
    buffers = ThreadsOf(monkeypatch, _snapshot.Snapshotter, "__init__")
    target = tmp_path / "c.weights.h5"
    ckpt = fastckpt.ModelCheckpoint(str(target), save_weights_only=True, save_on_background=True)
    seen = {}

    class Before(keras.callbacks.Callback):  # placed before `ckpt`
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                ckpt._readying.wait()
                seen["walks"], seen["buffers"] = walks.on_main(), buffers.on_main()
                seen["arenas"] = list(_snapshot.snapshotter_for(plan_of(self.model))._arenas)
                seen["ready"] = [a.prefault is None or a.prefault.wait(30) for a in seen["arenas"]]
                ckpt._ready()  # what the save does first: takes over the file reserved
                for spare in ckpt._spares[str(target)]:  # (its reservation may not have begun)
                    spare.reserving.wait(30)
                seen["reserved"] = {os.stat(tmp_path / n).st_ino for n in temp_files(tmp_path)}

    class After(keras.callbacks.Callback):  # placed after `ckpt`
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                seen["lent to"] = seen["arenas"][0].job

    oracle = KerasOracle(tmp_path / "oracle")
    fit([Before(), ckpt, After(), oracle], model=model)
    assert seen["walks"] == [False], "the model was walked on the training thread"
    assert seen["buffers"] == [False], "the snapshot buffer was made on the training thread"
    assert len(seen["arenas"]) == 1 and seen["ready"] == [True]
    assert seen["lent to"] is not None and not isinstance(seen["lent to"], _snapshot._Reserved)
    assert len(seen["reserved"]) == 1 and os.stat(target).st_ino not in seen["reserved"]
    assert walks.on_main() == [False], "a save walked the model again"
    assert_arrays_identical(oracle.values("e2"), h5_datasets(target))


def test_a_readying_that_fails_leaves_its_work_to_the_save(tmp_path, monkeypatch):
    """Readying is what makes the first save fast, not what makes it right: when it fails
    (here every snapshot buffer made off the training thread), the first save makes its
    own in its hook, and every checkpoint holds what Keras saves."""
    model = fresh_model(big=True)
    _walk._plans.pop(model, None)
    buffers = ThreadsOf(monkeypatch, _snapshot.Snapshotter, "__init__", fail_off_main=True)
    target = tmp_path / "c.weights.h5"
    ckpt = fastckpt.ModelCheckpoint(str(target), save_weights_only=True, save_on_background=True)
    oracle = KerasOracle(tmp_path / "oracle")
    fit([ckpt, oracle], model=model)
    assert buffers.on_main() == [False, True], "readied off the training thread, then by the save"
    assert_arrays_identical(oracle.values("e2"), h5_datasets(target))


def test_a_forked_child_gets_a_readying_thread_of_its_own():
    """The readying thread is the process's: a child forked after it started (which has
    no such thread) gets one of its own, and its tasks run."""
    fastckpt_callbacks._readying_thread().submit(lambda: None).result(timeout=30)
    with warnings.catch_warnings():
        # JAX warns that a fork of its threads may deadlock: the child uses none of them.
        warnings.filterwarnings("ignore", "os.fork", RuntimeWarning)
        pid = os.fork()
    if pid == 0:  # the child: no pytest in here, only an exit status
        try:
            ran = fastckpt_callbacks._readying_thread().submit(lambda: 7).result(timeout=10)
            os._exit(0 if ran == 7 else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_keras_file_s_assets_are_looked_for_before_the_first_save(tmp_path, monkeypatch):
    """A `.keras` file holds what objects save as assets, which Keras finds with a walk of
    the whole model: readying does that walk, and a model without assets is never walked
    for them on the training thread; the files are Keras's."""
    model = fresh_model(big=False)
    _walk._plans.pop(model, None)
    looks = ThreadsOf(monkeypatch, _keras_private, "model_assets")
    target = tmp_path / "c.keras"
    ckpt = fastckpt.ModelCheckpoint(str(target), save_on_background=True)
    fit([ckpt], model=model)
    assert looks.on_main() == [False]
    keras.saving.save_model(model, tmp_path / "keras.keras")
    with zipfile.ZipFile(target) as ours, zipfile.ZipFile(tmp_path / "keras.keras") as theirs:
        assert ours.namelist() == theirs.namelist()
        assert ours.read("config.json") == theirs.read("config.json")


# String inputs: TensorFlow only.
@pytest.mark.backends("tensorflow")
def test_a_keras_file_with_assets_gets_them_at_every_save(tmp_path, monkeypatch):
    """A model whose objects save assets (a `StringLookup`'s vocabulary) is looked at
    ahead of the first save, and again by every save (the vocabulary may change): each
    file carries what Keras's own `.keras` file of the model carries."""
    lookup = keras.layers.StringLookup()
    lookup.adapt(np.array(["red", "green", "green", "blue"]))
    inputs = keras.Input((1,), dtype="string")
    hidden = keras.layers.Flatten()(keras.layers.Embedding(8, 4)(lookup(inputs)))
    model = keras.Model(inputs, keras.layers.Dense(1)(hidden))
    model.compile(optimizer="adam", loss="mse")
    looks = ThreadsOf(monkeypatch, _keras_private, "model_assets")
    target = tmp_path / "c.keras"
    import tensorflow as tf

    x = tf.constant([["red"], ["blue"], ["green"], ["red"]])
    data = tf.data.Dataset.from_tensor_slices((x, tf.ones((4, 1)))).batch(2)
    ckpt = fastckpt.ModelCheckpoint(str(target), save_on_background=True)
    model.fit(data, epochs=2, shuffle=False, verbose=0, callbacks=[ckpt])
    assert looks.on_main() == [False, True, True], "ahead of the first save, then each save"
    model.save(tmp_path / "keras.keras")
    with zipfile.ZipFile(target) as ours, zipfile.ZipFile(tmp_path / "keras.keras") as theirs:
        assets = [n for n in theirs.namelist() if n.startswith("assets/")]
        assert assets and [n for n in ours.namelist() if n.startswith("assets/")] == assets
        assert [ours.read(n) for n in assets] == [theirs.read(n) for n in assets]
    loaded = keras.saving.load_model(target)
    assert loaded.layers[1].get_vocabulary() == lookup.get_vocabulary()


@pytest.mark.parametrize(
    "optimizer",
    [
        "adam",
        "sgd",
        lambda: keras.optimizers.SGD(momentum=0.9),
        "rmsprop",
        "adagrad",
        "adamw",
        lambda: keras.optimizers.Adam(amsgrad=True),
        lambda: keras.optimizers.Adam(use_ema=True),
        "lion",
        "nadam",
    ],
    ids=lambda o: o if isinstance(o, str) else "",
)
def test_the_expected_size_of_a_save_is_what_the_optimizer_builds(optimizer):
    """The estimate made before the optimizer exists (`sizes_once_built`) against Keras's
    own build of it: the same bytes, and nothing built by estimating."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((6,)), keras.layers.Dense(32), keras.layers.BatchNormalization()]
    )
    model.compile(optimizer=optimizer if isinstance(optimizer, str) else optimizer(), loss="mse")
    expected = _walk.sizes_once_built(model)
    assert not model.optimizer.built and expected is not None
    model.optimizer.build(model.trainable_variables)
    built = sorted(
        v.numpy().nbytes for v in list(model.variables) + list(model.optimizer.variables)
    )
    # The optimizer's own scalars (iterations, learning rate) are left out; no variable of
    # the model is that small.
    assert sorted(expected) == [n for n in built if n > 8], (sorted(expected), built)
    assert _walk.sizes_once_built(model) is None, "nothing to estimate once built"


@pytest.mark.parametrize("background", [True, False], ids=["background", "synchronous"])
def test_a_new_file_gets_room_reserved_for_its_first_two_saves(tmp_path, background):
    """A file name without fields gets a file reserved beside it after the first step, for
    the first save to write into; a new file's first save replaces nothing, so a second is
    reserved once the first save's write has ended, for the second save. Each later save
    writes into the file the save before it replaced. Watched through the files' inodes;
    the content is Keras's; no reserved or kept file stays once training has ended.
    Synchronous saves (PyTorch's default on a CPU) get both files too."""
    reserved: list[int] = []
    inodes = []
    target = tmp_path / "c.safetensors"

    class Before(keras.callbacks.Callback):  # placed before `ckpt`
        def on_epoch_end(self, epoch, logs=None):
            if epoch < 2:
                # The next reserved file, once it exists (kept files are temp files too).
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    found = {os.stat(tmp_path / n).st_ino for n in temp_files(tmp_path)}
                    new = found - set(reserved) - set(inodes)
                    if new:
                        reserved.append(new.pop())
                        break
                    time.sleep(0.01)

    class After(keras.callbacks.Callback):  # placed after `ckpt`
        def on_epoch_end(self, epoch, logs=None):
            ckpt.wait_until_finished()
            inodes.append(os.stat(target).st_ino)

    ckpt = fastckpt.ModelCheckpoint(str(target), save_on_background=background)
    oracle = KerasOracle(tmp_path / "oracle")
    fit([Before(), ckpt, After(), oracle], epochs=4)
    assert len(reserved) == 2, "a file reserved before each of the first two saves"
    assert inodes[:2] == reserved, (inodes, reserved)
    assert inodes[2:] == inodes[:2], "later saves write into the file replaced before them"
    assert_holds(target, oracle.values("e4"))
    assert wait_for_no_temp_files(tmp_path) == []


def test_an_existing_file_gets_room_reserved_for_one_save(tmp_path):
    """The first save replaces the file already there and keeps it for the second."""
    target = tmp_path / "c.safetensors"
    fastckpt.save(fresh_model(big=True), target)
    seen = []

    class Before(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ckpt._ready()  # takes over the file reserved on the readying thread
            for spare in ckpt._spares[str(target)]:  # (to know when they have all ended)
                spare.reserving.wait(30)
            seen.append(temp_files(tmp_path))

    ckpt = fastckpt.ModelCheckpoint(str(target))
    fit([Before(), ckpt], epochs=1)
    assert len(seen[0]) == 1, seen


def test_a_save_queued_behind_its_reservation_writes_into_the_reserved_file(
    memory_folder, fault_injection
):
    """A save taken before its reserved file is ready waits for it in the background (the
    snapshot is taken at once) and then writes into it, not into a new file. On tmpfs,
    where reserving a file also touches its memory, which takes a while."""
    tmp_path = memory_folder
    model = fresh_model(big=True)
    target = tmp_path / "c.weights.h5"
    with slow_writes(100):  # slows the reservation's pieces too
        spare, reserving = _fastckpt.reserve_spare(target, api.plan_bytes(plan_of_saved(model)))
        while not spare.exists():
            time.sleep(0.001)
        reserved_inode = os.stat(spare).st_ino
        job = api.start_save(model, target, background=True, reuse=spare, queue_after=[reserving])
        assert not reserving.done() and not job.begun(), "the reservation ended too soon"
        job.result()
    assert reserving.done() and reserving.exception() is None
    assert os.stat(target).st_ino == reserved_inode
    fastckpt.save(model, tmp_path / "fresh.weights.h5")
    assert target.read_bytes() == (tmp_path / "fresh.weights.h5").read_bytes()


def test_a_save_whose_reserved_file_is_gone_writes_a_new_one(tmp_path):
    """A reserved file removed before the save writes into it (a failed reservation leaves
    none) is no error: the save makes a new temp file, as it would without one."""
    model = fresh_model()
    target = tmp_path / "c.safetensors"
    spare, reserving = _fastckpt.reserve_spare(target, 1 << 20)
    reserving.result()
    os.remove(spare)
    api.start_save(model, target, background=True, reuse=spare).result()
    assert_holds(target, {k: v for k, v in h5_saved(model, tmp_path).items()})
    assert temp_files(tmp_path) == []


def test_reservations_run_one_after_the_other(memory_folder, fault_injection):
    """Each reservation begins once the jobs it is queued behind have ended (the saves need
    the buffers first, then the first file, then the second)."""
    tmp_path = memory_folder
    with slow_writes(100):
        first, first_job = _fastckpt.reserve_spare(tmp_path / "c.weights.h5", 24 << 20)
        second, second_job = _fastckpt.reserve_spare(
            tmp_path / "c.weights.h5", 24 << 20, after=[first_job]
        )
        while not first_job.begun():
            time.sleep(0.001)
        assert not second_job.begun() and not second.exists()
        first_job.result()
        second_job.result()
    assert os.path.getsize(first) == os.path.getsize(second) == 24 << 20


def test_a_save_takes_the_readiest_kept_file(memory_folder, fault_injection):
    """A save dropped before its write began hands its reserved file back behind the other
    one: the next save takes whichever is ready (or nearest to it), not the first in line."""
    target = memory_folder / "c.weights.h5"
    ckpt = fastckpt.ModelCheckpoint(str(target), save_weights_only=True)
    with slow_writes(100):
        first, first_job = _fastckpt.reserve_spare(target, 24 << 20)
        second, second_job = _fastckpt.reserve_spare(target, 24 << 20, after=[first_job])
        ckpt._keep_spare(str(target), fastckpt_callbacks._Spare(str(second), second_job))
        ckpt._keep_spare(str(target), fastckpt_callbacks._Spare(str(first), first_job))
        while not first_job.begun():
            time.sleep(0.001)
        assert ckpt._take_spare(str(target)).path == str(first), "the one being reserved"
        first_job.result()
        second_job.result()
    os.remove(first)  # taken: no save wrote into it
    ckpt._drop_spares()
    assert wait_for_no_temp_files(memory_folder) == []


def test_no_room_is_reserved_for_file_names_with_fields(tmp_path):
    seen = []

    class Look(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            seen.append(temp_files(tmp_path))

    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"))
    fit([ckpt, Look()], epochs=1)
    assert seen[0] == [] and seen[-1] == []


# Queued saves, dropped only when superseded for the same file -----------------------------


def test_a_queued_save_to_the_same_file_is_dropped_for_the_newer_one(tmp_path, fault_injection):
    out = io.StringIO()
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "c.weights.h5"),
        save_on_background=True,  # the background's mechanisms, under every backend
        save_weights_only=True,
        save_freq=1,
        snapshot_buffers=2,
        verbose=1,
    )
    oracle = KerasOracle(tmp_path / "oracle", batches=True)
    with slow_writes(60), contextlib.redirect_stdout(out):
        fit([ckpt, oracle], epochs=1)
    dropped = [line for line in out.getvalue().splitlines() if "was dropped" in line]
    finished = [line for line in out.getvalue().splitlines() if "finished saving" in line]
    steps = len(X) // BATCH
    assert dropped, "with writes slower than steps, some queued save must have been dropped"
    assert len(dropped) + len(finished) == steps, (dropped, finished)
    # The file holds the last step, as Keras's own save of that step does.
    assert_arrays_identical(oracle.values(f"e1b{steps}"), h5_datasets(tmp_path / "c.weights.h5"))


def test_saves_to_different_files_are_never_dropped(tmp_path, fault_injection):
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "ckpt" / "b{batch}.safetensors"), save_freq=1, snapshot_buffers=2
    )
    oracle = KerasOracle(tmp_path / "oracle", batches=True)
    with slow_writes(60):
        fit([ckpt, oracle], epochs=1)
    steps = len(X) // BATCH
    assert sorted(os.listdir(tmp_path / "ckpt")) == sorted(
        f"b{b}.safetensors" for b in range(1, steps + 1)
    )
    for b in range(1, steps + 1):
        assert_holds(tmp_path / "ckpt" / f"b{b}.safetensors", oracle.values(f"e1b{b}"))


@pytest.mark.parametrize("buffers", [1, 2])
def test_host_memory_is_bounded_by_snapshot_buffers(
    tmp_path, monkeypatch, fault_injection, buffers
):
    """However far the writes fall behind, at most `snapshot_buffers` saves hold a snapshot
    at once, and no more snapshot buffers than that are ever allocated."""
    most = []
    real = api.start_save
    holding: list[fastckpt.SaveJob] = []

    def start_save(*args, **kwargs):
        job = real(*args, **kwargs)
        holding[:] = [j for j in holding if not j.done()] + [job]
        most.append(len(holding))
        return job

    monkeypatch.setattr(api, "start_save", start_save)
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "b{batch}.weights.h5"),
        save_on_background=True,  # the background's mechanisms, under every backend
        save_weights_only=True,
        save_freq=1,
        snapshot_buffers=buffers,
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(512), keras.layers.Dense(2)])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    with slow_writes(40):
        fit([ckpt], epochs=2, model=model)
    assert max(most) == buffers, most
    assert len(_snapshot.snapshotter_for(plan_of(model))._arenas) <= buffers


def test_a_queued_save_that_has_not_begun_can_be_cancelled(tmp_path, fault_injection):
    model = fresh_model(big=True)
    with slow_writes(100):
        first = api.start_save(model, tmp_path / "a.weights.h5", background=True)
        second = api.start_save(
            model, tmp_path / "b.weights.h5", background=True, queue_after=[first]
        )
        while not first.begun():
            time.sleep(0.001)
        assert not second.begun()
        assert second.cancel() and second.done()
        assert not first.cancel(), "the first one is writing"
        first.result()
    with pytest.raises(concurrent.futures.CancelledError):
        second.result()
    assert sorted(os.listdir(tmp_path)) == ["a.weights.h5"]


# The last checkpoint, and kept files -----------------------------------------------------


# Only TensorFlow's buffers outlive the steps after them (JAX donates them, torch updates
# them in place): only there can a background write hold them.
@pytest.mark.backends("tensorflow")
def test_the_last_checkpoint_of_a_fit_is_written_from_the_variables_own_buffers(
    tmp_path, monkeypatch
):
    copies = []
    real = _fastckpt.copy_into
    monkeypatch.setattr(
        _snapshot._fastckpt, "copy_into", lambda pairs, **kw: (copies.append(1), real(pairs, **kw))
    )
    oracle = KerasOracle(tmp_path / "oracle")
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"))
    fit([ckpt, oracle], epochs=3)
    assert len(copies) == 2, "epochs 1 and 2 copy into the buffer; epoch 3 lends the variables"
    for e in (1, 2, 3):
        assert_holds(tmp_path / f"{e}.safetensors", oracle.values(f"e{e}"))


def test_each_save_writes_into_the_file_the_previous_save_replaced(tmp_path):
    """Watched through the file's inode: the third save's file is the first save's inode,
    kept (hidden) when the second save replaced it; the content is Keras's."""
    inodes = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ckpt.wait_until_finished()
            inodes.append(os.stat(tmp_path / "c.safetensors").st_ino)

    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "c.safetensors"))
    oracle = KerasOracle(tmp_path / "oracle")
    fit([ckpt, Look(), oracle], epochs=4)
    assert inodes[2] == inodes[0] and inodes[3] == inodes[1], inodes
    assert len(set(inodes)) == 2
    assert_holds(tmp_path / "c.safetensors", oracle.values("e4"))
    assert wait_for_no_temp_files(tmp_path) == []


@pytest.mark.parametrize("suffix", [".weights.h5", ".safetensors", ".keras"])
def test_a_file_written_into_a_kept_one_is_the_file_a_fresh_save_writes(tmp_path, suffix):
    big, small = fresh_model(big=True), fresh_model()
    target = tmp_path / f"c{suffix}"
    api.start_save(big, target, keep_replaced=True).result()
    job = api.start_save(big, target, keep_replaced=True)
    job.result()
    assert job.kept is not None and Path(job.kept).parent == tmp_path
    # A smaller checkpoint, written into the larger kept file.
    api.start_save(small, target, reuse=job.kept).result()
    assert not os.path.exists(job.kept)
    fastckpt.save(small, tmp_path / f"fresh{suffix}")
    assert target.read_bytes() == (tmp_path / f"fresh{suffix}").read_bytes()


def test_a_failed_rename_leaves_no_second_name_of_the_checkpoint(tmp_path, fault_injection):
    model = fresh_model()
    target = tmp_path / "c.safetensors"
    fastckpt.save(model, target)
    before = target.read_bytes()
    testing.inject_fault("rename")
    with pytest.raises(OSError):
        api.start_save(model, target, keep_replaced=True).result()
    testing.inject_fault(None)
    assert target.read_bytes() == before
    assert temp_files(tmp_path) == []
    assert os.stat(target).st_nlink == 1


# JAX -----------------------------------------------------------------------------------------


def test_jax_checkpoints_hold_what_keras_saves(tmp_path):
    """Under JAX (a child process: the backend is chosen at import) the callback's batched
    snapshot writes what Keras's own `save_weights` writes at the same step, and loads back."""
    script = textwrap.dedent(
        f"""
        import os
        os.environ["KERAS_BACKEND"] = "jax"
        import keras, numpy as np, h5py, fastckpt
        from fastckpt import _snapshot, _walk
        keras.utils.set_random_seed(0)
        def model():
            m = keras.Sequential([keras.Input((512,)), keras.layers.Dense(512),
                                  keras.layers.BatchNormalization(), keras.layers.Dense(4)])
            m.compile(optimizer="adam", loss="mse")
            return m
        m = model()
        x = np.random.default_rng(0).normal(size=(64, 512)).astype("float32")
        class Oracle(keras.callbacks.Callback):
            def on_train_batch_end(self, batch, logs=None):
                if (batch + 1) % 2 == 0:
                    self.model.save_weights(f"{tmp_path}/keras{{batch + 1}}.weights.h5")
        ckpt = fastckpt.ModelCheckpoint("{tmp_path}/ours{{batch}}.weights.h5",
                                        save_weights_only=True, save_freq=2)
        m.fit(x, x[:, :4], epochs=1, batch_size=8, verbose=0, callbacks=[ckpt, Oracle()])
        reader = type(_snapshot.snapshotter_for(_walk.plan_for(m))._read).__name__
        assert reader == "_JaxReader", reader
        def datasets(p):
            out = {{}}
            with h5py.File(p) as f:
                f.visititems(lambda n, o: out.__setitem__(n, o[()])
                             if isinstance(o, h5py.Dataset) else None)
            return out
        for b in (2, 4, 6, 8):
            ours = datasets(f"{tmp_path}/ours{{b}}.weights.h5")
            theirs = datasets(f"{tmp_path}/keras{{b}}.weights.h5")
            assert ours.keys() == theirs.keys()
            for k in ours:
                assert ours[k].dtype == theirs[k].dtype, k
                assert ours[k].tobytes() == theirs[k].tobytes(), k
        again = model()
        fastckpt.load(again, f"{tmp_path}/ours8.weights.h5")
        for a, b in zip(m.variables + m.optimizer.variables,
                        again.variables + again.optimizer.variables):
            assert np.array_equal(np.asarray(a.value), np.asarray(b.value)), a.path
        print("ok")
        """
    )
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    run = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]


def test_callbacks_module_keeps_no_reference_to_finished_saves(tmp_path):
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "c.safetensors"), save_freq=2)
    fit([ckpt], epochs=1)
    assert ckpt._saves == [] and not fastckpt_callbacks._IN_FLIGHT


def test_a_dropped_model_takes_its_plan_and_snapshot_buffers_with_it(tmp_path):
    """The plan, its snapshotter and their buffers live as long as the model: nothing
    fastckpt caches keeps a model's memory after the model is gone."""
    import gc
    import weakref

    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(512), keras.layers.Dense(512)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    fastckpt.save(model, tmp_path / "c.weights.h5", background=True).result()
    plan = plan_of(model)
    snapper = _snapshot.snapshotter_for(plan)
    refs = [weakref.ref(x) for x in (model, plan, snapper, snapper._arenas[0])]
    del model, plan, snapper
    gc.collect()
    assert [r() is None for r in refs] == [True] * 4


# Host memory -------------------------------------------------------------------------------


def mapping_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry (its fields) of the mapping holding `address`."""
    fields: dict[str, str] = {}
    found = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                if found:
                    break
                start, end = (int(x, 16) for x in head.split("-"))
                found = start <= address < end
                fields = {"Size": str(end - start)}
            elif found:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    assert found, f"no mapping holds {address:#x}"
    return fields


def test_snapshot_buffers_are_small_pages_faulted_in_ahead(tmp_path):
    """A snapshot buffer is memory of its own in small pages (a huge page takes a whole
    free 2 MiB block, which a VM that hands free memory back to its host has dropped:
    5-7x dearer to touch first), and once its prefault job ends every page is resident,
    as the kernel counts it."""
    model = fresh_model(big=True)
    owner = keras.callbacks.Callback()  # anything a weak reference can point at
    [arena] = api.prepare(model, buffers=1, owner=owner)
    address = arena.block.ctypes.data
    assert "nh" in mapping_of(address)["VmFlags"].split(), "huge pages not turned off"
    assert arena.prefault.wait(30) and arena.prefault.exception() is None
    resident_kib = int(mapping_of(address)["Rss"].split()[0])
    assert resident_kib * 1024 >= arena.block.nbytes
