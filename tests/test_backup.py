"""`fastckpt.BackupAndRestore` against Keras's own `BackupAndRestore` as the oracle: each
restores the other's backups, the files are Keras's (names, `training_metadata.json` byte
for byte, the weights as h5py reads them), an interrupted run resumes to the weights an
uninterrupted one ends with, and failures keep the previous backup. Also
`fastckpt.latest`. Kills and preemption of real processes are in test_resume.py.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import warnings
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

import fastckpt
from callback_support import BATCH, X, Y, assert_arrays_identical, fresh_model, h5_datasets
from fastckpt import _fastckpt, callbacks

EPOCHS = 4
STEPS = len(X) // BATCH


class Interrupt(Exception):
    """Stands for a crash of the training script."""


class InterruptAt(keras.callbacks.Callback):
    """Raises `Interrupt` as batch `batch` of epoch `epoch` begins (after the hooks of the
    callbacks before it in the list)."""

    def __init__(self, epoch: int, batch: int = 0) -> None:
        super().__init__()
        self.at = (epoch, batch)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self._epoch, batch) == self.at:
            raise Interrupt


class Epochs(keras.callbacks.Callback):
    """Records the epochs that ran and the first batch seen in each."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[int, int]] = []

    def on_epoch_begin(self, epoch, logs=None):
        self.seen.append((epoch, -1))

    def on_train_batch_begin(self, batch, logs=None):
        if self.seen[-1][1] == -1:
            self.seen[-1] = (self.seen[-1][0], batch)


def model_state(model: keras.Model) -> dict[str, np.ndarray]:
    """Every variable of the model and its optimizer, by path."""
    variables = [*model.variables, *model.optimizer.variables]
    state = {v.path: v.numpy() for v in variables}
    assert len(state) == len(variables), "variable paths are unique"
    return state


class Batches(keras.utils.PyDataset):
    """The arrays' batches, in order."""

    def __len__(self):
        return STEPS

    def __getitem__(self, i):
        return X[i * BATCH : (i + 1) * BATCH], Y[i * BATCH : (i + 1) * BATCH]


def data(kind: str) -> dict:
    """`fit`'s data arguments: the same batches as arrays, a `PyDataset` or `tf.data`."""
    if kind == "arrays":
        return {"x": X, "y": Y, "batch_size": BATCH, "shuffle": False}
    if kind == "shuffled arrays":
        return {"x": X, "y": Y, "batch_size": BATCH, "shuffle": True}
    # `fit` shuffles a finite `PyDataset`'s batches unless told not to (and warns that it
    # ignores `shuffle=True` for `tf.data`).
    if kind == "PyDataset":
        return {"x": Batches(), "shuffle": False}
    import tensorflow as tf

    return {"x": tf.data.Dataset.from_tensor_slices((X, Y)).batch(BATCH), "shuffle": False}


def fit(*callbacks, epochs: int = EPOCHS, kind: str = "arrays") -> tuple[keras.Model, dict]:
    """`fit` of the test model from its initial state; an `Interrupt` ends it early."""
    model = fresh_model()
    model._initial_epoch = None  # Keras never clears what a restore set
    history: dict = {}
    try:
        history = model.fit(
            **data(kind), epochs=epochs, verbose=0, callbacks=list(callbacks)
        ).history
    except Interrupt:
        pass
    callbacks_module_wait()
    return model, history


def callbacks_module_wait() -> None:
    """An interrupted `fit` leaves its background backup to finish."""
    callbacks.wait_for_saves_in_flight()


def names(folder: Path) -> list[str]:
    """The files of a backup folder, less the temp file an interrupted `fit` keeps for its
    next backup to write into (removed at the end of a `fit` that completes)."""
    return sorted(n for n in os.listdir(folder) if not _fastckpt.is_temp_name(n))


def weights_of(path: Path) -> dict[str, np.ndarray]:
    """The file's datasets as h5py reads them, less fastckpt's own group."""
    return {k: v for k, v in h5_datasets(path).items() if not k.startswith("fastckpt/")}


@pytest.fixture(scope="module")
def uninterrupted():
    """The state and history a `fit` without interruption ends with."""
    model, history = fit()
    return model_state(model), history


def test_our_backup_files_are_keras_files(tmp_path):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    fit(fastckpt.BackupAndRestore(ours), InterruptAt(2))
    fit(keras.callbacks.BackupAndRestore(theirs), InterruptAt(2))
    assert names(ours) == names(theirs) == ["latest.weights.h5", "training_metadata.json"]
    for name in ("training_metadata.json",):
        assert (ours / name).read_bytes() == (theirs / name).read_bytes()
    assert_arrays_identical(
        weights_of(ours / "latest.weights.h5"), weights_of(theirs / "latest.weights.h5")
    )
    with h5py.File(ours / "latest.weights.h5") as f:
        state = json.loads(f.attrs[fastckpt.backup.STATE_ATTR])
    assert (state["epoch"], state["steps_done"]) == (2, 0)


def test_keras_resumes_from_our_backup_and_we_from_theirs(tmp_path, uninterrupted):
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    fit(fastckpt.BackupAndRestore(ours, delete_checkpoint=False), InterruptAt(2))
    fit(keras.callbacks.BackupAndRestore(theirs), InterruptAt(2))
    expected, _ = uninterrupted
    for backup_dir, callback_class in [
        (ours, keras.callbacks.BackupAndRestore),
        (theirs, fastckpt.BackupAndRestore),
    ]:
        epochs = Epochs()
        model, _ = fit(callback_class(backup_dir), epochs)
        assert [e for e, _ in epochs.seen] == [2, 3], callback_class
        assert_arrays_identical(model_state(model), expected)
        assert not backup_dir.exists(), "delete_checkpoint removes the folder"


@pytest.mark.parametrize("save_freq", [1, 2, 5])
def test_a_run_interrupted_inside_an_epoch_resumes_at_its_step(tmp_path, uninterrupted, save_freq):
    expected, expected_history = uninterrupted
    backup_dir = tmp_path / "backup"
    fit(fastckpt.BackupAndRestore(backup_dir, save_freq=save_freq), InterruptAt(1, 5))
    with h5py.File(backup_dir / "latest.weights.h5") as f:
        state = json.loads(f.attrs[fastckpt.backup.STATE_ATTR])
    # The last backup due before step 5 of epoch 1 (steps count across epochs, as Keras's).
    step = ((STEPS + 5) // save_freq) * save_freq
    assert (state["epoch"], state["steps_done"]) == divmod(step, STEPS)
    epochs = Epochs()
    model, history = fit(fastckpt.BackupAndRestore(backup_dir, save_freq=save_freq), epochs)
    assert epochs.seen[0] == divmod(step, STEPS)
    assert_arrays_identical(model_state(model), expected)
    # The metrics of the epoch resumed count the steps trained before the interruption.
    for name, values in history.items():
        assert values == expected_history[name][-len(values) :], name


@pytest.mark.parametrize("kind", ["PyDataset", "tf.data"])
def test_other_data_resume_at_their_step(tmp_path, kind):
    expected = model_state(fit(kind=kind)[0])
    backup_dir = tmp_path / "backup"
    fit(fastckpt.BackupAndRestore(backup_dir, save_freq=1), InterruptAt(2, 3), kind=kind)
    epochs = Epochs()
    model, _ = fit(fastckpt.BackupAndRestore(backup_dir, save_freq=1), epochs, kind=kind)
    assert epochs.seen[0] == (2, 3)
    assert_arrays_identical(model_state(model), expected)


# TensorFlow's shuffle warns about numpy 2's `copy` keyword; `pytest.warns` re-raises it
# as the test's own.
@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_shuffled_data_resume_at_the_epoch_start_as_keras_does(tmp_path):
    backup_dir = tmp_path / "backup"
    fit(
        fastckpt.BackupAndRestore(backup_dir, save_freq=1),
        InterruptAt(1, 3),
        kind="shuffled arrays",
    )
    epochs = Epochs()
    with pytest.warns(UserWarning, match="resumes epoch 2 from its first step.*shuffled"):
        fit(
            fastckpt.BackupAndRestore(backup_dir, save_freq=1),
            epochs,
            kind="shuffled arrays",
        )
    assert epochs.seen[0] == (1, 0)


def test_double_checkpoint_falls_back_to_the_previous_backup_as_keras_does(tmp_path):
    ours = tmp_path / "ours"
    fit(
        fastckpt.BackupAndRestore(ours, double_checkpoint=True, delete_checkpoint=False),
        epochs=3,
    )
    assert names(ours) == [
        "latest.weights.h5",
        "latest.weights.h5.bkp",
        "training_metadata.json",
        "training_metadata.json.bkp",
    ]
    assert json.loads((ours / "training_metadata.json").read_text())["epoch"] == 3
    assert json.loads((ours / "training_metadata.json.bkp").read_text())["epoch"] == 2
    data = (ours / "latest.weights.h5").read_bytes()
    (ours / "latest.weights.h5").write_bytes(data[: len(data) // 2])  # damaged
    theirs = tmp_path / "theirs"
    shutil.copytree(ours, theirs)
    for backup_dir, callback_class in [
        (ours, fastckpt.BackupAndRestore),
        (theirs, keras.callbacks.BackupAndRestore),
    ]:
        epochs = Epochs()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(callback_class(backup_dir, delete_checkpoint=False), epochs)
        assert [e for e, _ in epochs.seen] == [2, 3], callback_class
        if callback_class is fastckpt.BackupAndRestore:
            assert any("previous backup" in str(w.message) for w in caught)
    assert_arrays_identical(
        weights_of(ours / "latest.weights.h5"), weights_of(theirs / "latest.weights.h5")
    )


def test_a_failed_backup_is_raised_and_the_previous_one_stays(tmp_path, fault_injection):
    backup_dir = tmp_path / "backup"

    class FailFrom(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:  # after the backup of epoch 1's end has begun
                callbacks.wait_for_saves_in_flight()
                _fastckpt.testing.inject_fault("fsync")

    with pytest.raises(OSError) as info:
        # (Kept at the end: a backup still queued when `fit` ends would be dropped with
        # the folder, and its error with it.)
        fit(fastckpt.BackupAndRestore(backup_dir, delete_checkpoint=False), FailFrom())
    assert info.value.errno == errno.EIO
    assert info.value.filename == str(backup_dir / "latest.weights.h5")
    _fastckpt.testing.inject_fault(None)
    assert names(backup_dir) == ["latest.weights.h5", "training_metadata.json"]
    assert json.loads((backup_dir / "training_metadata.json").read_text())["epoch"] == 2
    epochs = Epochs()
    fit(keras.callbacks.BackupAndRestore(backup_dir), epochs)  # stock Keras reads it
    assert [e for e, _ in epochs.seen] == [2, 3]


def fill(folder: Path) -> None:
    """Takes every free block of the filesystem of `folder`."""
    # Unbuffered: a buffered file would fail again when closed.
    with open(folder / "filler", "wb", buffering=0) as f:
        chunk = b"\0" * 4096
        try:
            while True:
                f.write(chunk)
        except OSError as e:
            assert e.errno == errno.ENOSPC


def test_a_full_disk_fails_the_backup_and_keeps_the_previous_one(tiny_tmpfs):
    backup_dir = tiny_tmpfs / "backup"

    class FillAt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 2:
                callbacks.wait_for_saves_in_flight()
                fill(tiny_tmpfs)

    with pytest.raises(OSError) as info:
        # (Kept at the end: a backup still queued when `fit` ends would be dropped with
        # the folder, and its error with it.)
        fit(fastckpt.BackupAndRestore(backup_dir, delete_checkpoint=False), FillAt())
    assert info.value.errno == errno.ENOSPC
    assert str(backup_dir) in str(info.value.filename)
    (tiny_tmpfs / "filler").unlink()
    assert names(backup_dir) == ["latest.weights.h5", "training_metadata.json"]
    assert json.loads((backup_dir / "training_metadata.json").read_text())["epoch"] == 2
    epochs = Epochs()
    fit(keras.callbacks.BackupAndRestore(backup_dir), epochs)
    assert [e for e, _ in epochs.seen] == [2, 3]


def test_a_folder_that_vanishes_during_a_backup_is_an_error_naming_it(tmp_path, fault_injection):
    backup_dir = tmp_path / "backup"

    class RemoveDuringBackup(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch == 1:  # the first backup is being written
                # The writer may make its next temp file between `rmtree`'s listing and
                # its `rmdir` (ENOTEMPTY): remove until the folder is gone.
                for _ in range(100):
                    shutil.rmtree(backup_dir, ignore_errors=True)
                    if not backup_dir.exists():
                        break
                assert not backup_dir.exists()

    _fastckpt.testing.inject_delay(200)
    with pytest.raises(FileNotFoundError) as info:
        # In the background on every backend (torch on a CPU writes in the hook by
        # default: the backup would be done, and the next one makes the folder again).
        fit(fastckpt.BackupAndRestore(backup_dir, save_on_background=True), RemoveDuringBackup())
    _fastckpt.testing.inject_delay(0)
    assert str(backup_dir) in str(info.value.filename)
    assert not backup_dir.exists() or names(backup_dir) == []
    # A new `fit` makes the folder again and trains from the start.
    epochs = Epochs()
    fit(fastckpt.BackupAndRestore(backup_dir, delete_checkpoint=False), epochs)
    assert [e for e, _ in epochs.seen] == [0, 1, 2, 3]
    assert json.loads((backup_dir / "training_metadata.json").read_text())["epoch"] == 4


def test_a_signal_after_a_failed_fit_reaches_the_previous_handler(tmp_path):
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: received.append(signum))
    try:
        backup = fastckpt.BackupAndRestore(
            tmp_path / "backup", preemption_signals=(signal.SIGUSR1,)
        )
        fit(backup, InterruptAt(1))
        os.kill(os.getpid(), signal.SIGUSR1)
        assert received == [signal.SIGUSR1]
        assert signal.getsignal(signal.SIGUSR1) is not backup._on_signal
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_preemption_signal_backs_up_the_step_then_is_handled_as_before(tmp_path):
    class Preempted(Exception):
        pass

    def preempted(signum, frame):
        raise Preempted

    class SignalAt(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self._epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if (self._epoch, batch) == (1, 2):
                os.kill(os.getpid(), signal.SIGUSR1)

    backup_dir = tmp_path / "backup"
    previous = signal.signal(signal.SIGUSR1, preempted)
    try:
        with pytest.raises(Preempted):
            fit(
                fastckpt.BackupAndRestore(
                    backup_dir, save_freq=False, preemption_signals=(signal.SIGUSR1,)
                ),
                SignalAt(),
            )
        assert signal.getsignal(signal.SIGUSR1) is preempted
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with h5py.File(backup_dir / "latest.weights.h5") as f:
        state = json.loads(f.attrs[fastckpt.backup.STATE_ATTR])
    assert (state["epoch"], state["steps_done"]) == (1, 3)
    assert json.loads((backup_dir / "training_metadata.json").read_text()) == {
        "epoch": 1,
        "batch": 2,
    }


# fastckpt.latest ------------------------------------------------------------------------


def saved_at(model: keras.Model, path: Path, step: int, writer: str = "fastckpt") -> Path:
    model.optimizer.iterations.assign(step)
    if writer == "keras":
        model.save_weights(path)
    else:
        fastckpt.save(model, path)
    return path


def test_latest_is_the_highest_recorded_step_not_the_newest_file(tmp_path):
    model = fresh_model()
    saved_at(model, tmp_path / "b.weights.h5", 30)
    saved_at(model, tmp_path / "a.safetensors", 20)
    keras_file = saved_at(model, tmp_path / "k.weights.h5", 40, writer="keras")
    saved_at(model, tmp_path / "old.weights.h5", 10)  # written last, the oldest step
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    assert fastckpt.latest(tmp_path) == str(keras_file)
    assert fastckpt.latest(tmp_path / "*.safetensors") == str(tmp_path / "a.safetensors")
    assert fastckpt.latest(tmp_path / "nothing-*.h5") is None


def test_latest_skips_damaged_and_temp_files(tmp_path):
    model = fresh_model()
    good = saved_at(model, tmp_path / "good.weights.h5", 5)
    # A payload byte of a file with checksums: it still opens, and fails verification.
    damaged = saved_at(model, tmp_path / "damaged.safetensors", 9)
    data = bytearray(damaged.read_bytes())
    data[-3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    # A `.weights.h5` (no checksums, as Keras's) cut short: it no longer opens.
    cut = saved_at(model, tmp_path / "cut.weights.h5", 11)
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    saved_at(model, tmp_path / "temp.weights.h5", 12)
    os.rename(tmp_path / "temp.weights.h5", tmp_path / ".temp.weights.h5.fastckpt-1-0.tmp")
    assert fastckpt.latest(tmp_path) == str(good)
    assert fastckpt.latest(tmp_path, verify=False) == str(damaged)


def test_latest_counts_a_sharded_checkpoint_once(tmp_path):
    model = fresh_model()
    saved_at(model, tmp_path / "one.weights.h5", 3)
    model.optimizer.iterations.assign(7)
    fastckpt.save(model, tmp_path / "sharded.weights.json", max_shard_size=2e-7)  # 214 B
    assert len([n for n in os.listdir(tmp_path) if n.startswith("sharded_")]) > 1
    assert fastckpt.latest(tmp_path) == str(tmp_path / "sharded.weights.json")
