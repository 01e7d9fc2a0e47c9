"""fastckpt.ModelCheckpoint's own behaviour: background saves and their failures,
`wait_until_finished`, `max_to_keep`, `period`, `options`, and `save_best_only` with an
integer `save_freq` (where Keras 3.15 crashes).

The oracle for what a file must hold is stock Keras: a callback placed after ours calls
`model.save_weights` at the same step, and our file must hold the same values, bit for bit,
read with the `safetensors` package.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import fastckpt
from callback_support import (
    BATCH,
    FINISHED,
    X_VAL,
    Y_VAL,
    X,
    Y,
    assert_arrays_identical,
    fresh_model,
    h5_datasets,
    list_files,
    safetensors_tensors,
    strip_size_suffix,
)
from fastckpt import callbacks as fastckpt_callbacks
from fastckpt._fastckpt import testing


def fit(callbacks, *, epochs=3, big=False, steps_per_execution=1, validation=True, **kwargs):
    model = fresh_model(steps_per_execution, big)
    return model.fit(
        X,
        Y,
        batch_size=BATCH,
        epochs=epochs,
        validation_data=(X_VAL, Y_VAL) if validation else None,
        shuffle=False,
        verbose=0,
        callbacks=callbacks,
        **kwargs,
    )


class KerasOracle(keras.callbacks.Callback):
    """Saves the weights with stock Keras at every epoch end (and every batch end if
    `batches`), as `<folder>/e{epoch}.weights.h5` / `e{epoch}b{batch}.weights.h5`, 1-based.
    Placed after ours, it sees the state ours saved."""

    def __init__(self, folder: Path, batches: bool = False):
        super().__init__()
        self.folder = folder
        self.batches = batches
        self.epoch = 0
        self.batch_logs: list[tuple[int, int, dict]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self.batch_logs.append((self.epoch, batch, dict(logs or {})))
        if self.batches:
            self.model.save_weights(self.folder / f"e{self.epoch + 1}b{batch + 1}.weights.h5")

    def on_epoch_end(self, epoch, logs=None):
        self.model.save_weights(self.folder / f"e{epoch + 1}.weights.h5")

    def values(self, name: str) -> dict[str, np.ndarray]:
        return h5_datasets(self.folder / f"{name}.weights.h5")


def assert_holds(path: Path, expected: dict[str, np.ndarray]) -> None:
    tensors, _ = safetensors_tensors(path)
    assert_arrays_identical(expected, tensors)


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob(".*") if p.is_file()]


class ArmFault(keras.callbacks.Callback):
    """Placed before `ckpt`: makes its save at the end of epoch `at` (0-based), and every
    later fastckpt save, fail with EIO at `stage`, the way a full or broken disk would. The
    switch is process-wide, so the save still in flight is waited for first."""

    def __init__(self, ckpt, at: int, stage: str = "rename"):
        super().__init__()
        self.ckpt = ckpt
        self.at = at
        self.stage = stage

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.at:
            self.ckpt.wait_until_finished()
            testing.inject_fault(self.stage)


# Background saves are complete, and hold the step they name ------------------------------


def test_files_are_complete_and_hold_the_step_they_name_when_fit_returns(tmp_path):
    oracle = KerasOracle(tmp_path / "oracle", batches=True)
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "ckpt" / "e{epoch}b{batch}.safetensors"), save_freq=2
    )
    fit([ckpt, oracle], epochs=2, big=True)
    names = [f"e{e}b{b}" for e in (1, 2) for b in (2, 4, 6)]
    assert list_files(tmp_path / "ckpt") == sorted(f"{n}.safetensors" for n in names)
    for name in names:
        assert_holds(tmp_path / "ckpt" / f"{name}.safetensors", oracle.values(name))


def test_one_save_in_flight_at_a_time(tmp_path, monkeypatch):
    started: list[fastckpt.SaveJob] = []
    overlapping = []
    real_save = fastckpt.api.start_save

    def save(*args, **kwargs):
        overlapping.extend(job for job in started if not job.done())
        job = real_save(*args, **kwargs)
        started.append(job)
        return job

    monkeypatch.setattr(fastckpt.api, "start_save", save)
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "b{batch}.safetensors"), save_freq=1)
    fit([ckpt], epochs=1, big=True)
    assert len(started) == 6
    assert overlapping == []
    assert all(job.done() for job in started)


def test_a_save_that_ends_while_the_next_is_readied_is_reported_before_it(
    tmp_path, monkeypatch, capsys
):
    """The previous save may end between the callback's looks at it (seen running, then
    seen done): its "finished saving" line still comes before the next save's line. Here
    the first two looks at a job after it ended answer "running", as if it ended just then
    (the batch hook looks once, then the save looks again before it waits)."""
    from fastckpt import _keras_private

    looks_after_end: dict[fastckpt.SaveJob, int] = {}  # holds the jobs: no id is reused
    real_done = fastckpt.SaveJob.done

    def done(job):
        if not real_done(job):
            return False
        looks_after_end[job] = looks_after_end.get(job, 0) + 1
        return looks_after_end[job] > 2

    started: list[fastckpt.SaveJob] = []
    real_save = fastckpt.api.start_save

    def save(*args, **kwargs):
        started.append(real_save(*args, **kwargs))
        return started[-1]

    class WriteEnds(keras.callbacks.Callback):
        """After ours: each write ends before the next step (the next hook looks at it)."""

        def on_train_batch_end(self, batch, logs=None):
            for job in started:
                job.wait()

    monkeypatch.setattr(fastckpt.SaveJob, "done", done)
    monkeypatch.setattr(fastckpt.api, "start_save", save)
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "b{batch}.safetensors"), save_freq=1, verbose=1)
    fit([ckpt, WriteEnds()], epochs=1)
    lines = [
        (line.split(" model to ")[0].split(": ")[1], Path(line.split(" model to ")[1]).name)
        for line in strip_size_suffix(capsys.readouterr().out.splitlines())
        if " model to " in line
    ]
    files = list_files(tmp_path)
    assert len(files) == 6
    # (Keras before 3.13 prints no "finished saving" line, and neither do ours then.)
    kinds = ("saving", "finished saving") if _keras_private.PRINTS_FINISHED_SAVING else ("saving",)
    assert lines == [(kind, f) for f in files for kind in kinds]


def _background_flags(monkeypatch) -> list[bool]:
    """The `background` of every save fastckpt's callbacks start from now on."""
    flags: list[bool] = []
    real_save = fastckpt.api.start_save

    def save(*args, **kwargs):
        flags.append(kwargs["background"])
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fastckpt.api, "start_save", save)
    return flags


@pytest.mark.parametrize("asked", [None, True, False])
def test_saves_are_written_in_the_background_except_under_torch_on_the_cpu(
    tmp_path, monkeypatch, asked
):
    """By default a save is written in the background, except under PyTorch with the
    model on the CPU (no GPU here), where a background writer slows the steps by more
    than the write takes: the write is done in the hook there. `True` and `False` are
    obeyed on every backend."""
    flags = _background_flags(monkeypatch)
    kwargs = {} if asked is None else {"save_on_background": asked}
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), **kwargs)
    fit([ckpt], epochs=2)
    expected = (keras.backend.backend() != "torch") if asked is None else asked
    assert flags == [expected, expected]
    assert list_files(tmp_path) == ["1.safetensors", "2.safetensors"]


def test_backup_and_restore_follows_the_same_default(tmp_path, monkeypatch):
    flags = _background_flags(monkeypatch)
    backup = fastckpt.BackupAndRestore(str(tmp_path / "backup"))
    fit([backup], epochs=3)
    # The backup of the last epoch is not written (`delete_checkpoint` would remove it).
    assert flags == [keras.backend.backend() != "torch"] * 2


def test_synchronous_mode_saves_before_the_next_callback_runs(tmp_path):
    seen = []

    class Look(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            seen.append((tmp_path / f"{epoch + 1}.safetensors").exists())

    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), save_on_background=False)
    fit([ckpt, Look()], epochs=2)
    assert seen == [True, True]


def test_wait_until_finished(tmp_path):
    model = fresh_model(big=True)
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"))
    ckpt.set_model(model)
    ckpt.on_train_begin()
    ckpt.on_epoch_begin(0)
    ckpt.on_epoch_end(0, logs={"val_loss": 1.0})
    ckpt.wait_until_finished()
    model.save_weights(tmp_path / "oracle.weights.h5")
    assert_holds(tmp_path / "1.safetensors", h5_datasets(tmp_path / "oracle.weights.h5"))
    ckpt.wait_until_finished()  # nothing in flight: returns at once


def test_verbose_appends_size_and_time_of_the_save(tmp_path, capsys):
    """Keras 3.13+ prints "finished saving model to P" after each save, and fastckpt appends
    the size and time to it; Keras 3.12 prints no such line, and neither does fastckpt."""
    from fastckpt import _keras_private

    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), verbose=1)
    fit([ckpt], epochs=2)
    lines = [line for line in capsys.readouterr().out.splitlines() if "finished" in line]
    if not _keras_private.PRINTS_FINISHED_SAVING:
        assert lines == []
        return
    assert len(lines) == 2
    for epoch, line in enumerate(lines, start=1):
        match = FINISHED.match(line)
        assert match, line
        size = os.path.getsize(tmp_path / f"{epoch}.safetensors")
        assert match.group(2) == (f"{size} B" if size < 1024 else f"{size / 1024:.2f} KiB")


# Failures -------------------------------------------------------------------------------------


def test_folder_that_cannot_be_created_fails_fit_and_keeps_earlier_checkpoint(tmp_path):
    (tmp_path / "2").write_text("a file where epoch 2's folder should go")
    oracle = KerasOracle(tmp_path / "oracle")
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}" / "sub" / "w.safetensors"))
    with pytest.raises(OSError) as raised:
        fit([ckpt, oracle], epochs=3)
    assert raised.value.errno == errno.ENOTDIR  # what Keras's makedirs raises too
    assert_holds(tmp_path / "1" / "sub" / "w.safetensors", oracle.values("e1"))
    assert not (tmp_path / "3").exists()
    assert no_temp_files(tmp_path)


def test_background_write_failure_raises_at_the_next_hook(tmp_path, fault_injection):
    oracle = KerasOracle(tmp_path / "oracle")
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "ckpt" / "{epoch}.safetensors"))
    with pytest.raises(OSError) as raised:
        fit([ArmFault(ckpt, at=1), ckpt, oracle], epochs=4, big=True)
    assert raised.value.errno == errno.EIO
    assert "2.safetensors" in str(raised.value)
    # Raised no later than the next save, which waits for this one: epoch 3 never ended.
    assert not (oracle.folder / "e3.weights.h5").exists()
    assert list_files(tmp_path / "ckpt") == ["1.safetensors"]
    assert_holds(tmp_path / "ckpt" / "1.safetensors", oracle.values("e1"))


def test_failure_of_the_last_save_is_raised_by_fit(tmp_path, fault_injection):
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"))
    with pytest.raises(OSError) as raised:
        fit([ArmFault(ckpt, at=1), ckpt], epochs=2)
    assert raised.value.errno == errno.EIO
    assert list_files(tmp_path) == ["1.safetensors"]
    ckpt.wait_until_finished()  # reported once, not again


def test_failed_save_leaves_the_previous_file_under_the_same_name(tmp_path, fault_injection):
    oracle = KerasOracle(tmp_path / "oracle")
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "ckpt" / "last.safetensors"))
    with pytest.raises(OSError):
        fit([ArmFault(ckpt, at=2, stage="write"), ckpt, oracle], epochs=3, big=True)
    assert list_files(tmp_path / "ckpt") == ["last.safetensors"]
    assert_holds(tmp_path / "ckpt" / "last.safetensors", oracle.values("e2"))


def test_wait_until_finished_raises_a_failed_save_once(tmp_path, fault_injection):
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), save_on_background=True)
    ckpt.set_model(fresh_model())
    testing.inject_fault("fsync")
    ckpt.on_epoch_begin(0)
    ckpt.on_epoch_end(0, logs={"val_loss": 1.0})
    with pytest.raises(OSError):
        ckpt.wait_until_finished()
    ckpt.wait_until_finished()
    assert list_files(tmp_path) == []


@pytest.mark.parametrize("hook", ["on_train_batch_end", "on_epoch_end", "on_train_end"])
def test_failed_background_save_raises_at_the_first_hook_after_it_ended(
    tmp_path, fault_injection, hook
):
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), save_on_background=True)
    ckpt.set_model(fresh_model())
    ckpt.on_train_begin()
    ckpt.on_epoch_begin(0)
    testing.inject_fault("write")
    ckpt.on_epoch_end(0, logs={"val_loss": 1.0})
    job = ckpt._saves[0].handle
    assert isinstance(job, fastckpt.SaveJob)
    job.wait(60)
    calls = {
        "on_train_batch_end": lambda: ckpt.on_train_batch_end(0, logs={"loss": 1.0}),
        "on_epoch_end": lambda: ckpt.on_epoch_end(1, logs={}),
        "on_train_end": lambda: ckpt.on_train_end(logs={}),
    }
    testing.inject_fault(None)
    with pytest.raises(OSError) as raised:
        calls[hook]()
    assert raised.value.errno == errno.EIO
    assert list_files(tmp_path) == []


def test_exception_in_training_does_not_hang_the_interpreter(tmp_path):
    """A save in flight when training dies still lands, and the process exits."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import keras
        import fastckpt
        from callback_support import BATCH, X, Y, fresh_model

        class Boom(keras.callbacks.Callback):
            def on_epoch_end(self, epoch, logs=None):
                raise RuntimeError("boom after the save was handed off")

        ckpt = fastckpt.ModelCheckpoint({str(tmp_path / "{epoch}.safetensors")!r})
        fresh_model(big=True).fit(
            X, Y, batch_size=BATCH, epochs=3, verbose=0, callbacks=[ckpt, Boom()]
        )
        """
    )
    # The fastckpt these tests import.
    path = [str(Path(fastckpt.__file__).parent.parent), os.environ.get("PYTHONPATH", "")]
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(path)},
    )
    assert done.returncode == 1, done.stderr
    assert "RuntimeError: boom after the save was handed off" in done.stderr
    assert list_files(tmp_path) == ["1.safetensors"]
    tensors, _ = safetensors_tensors(tmp_path / "1.safetensors")
    assert "layers/dense_1/vars/0" in tensors


# max_to_keep ----------------------------------------------------------------------------------


def test_max_to_keep_deletes_only_our_older_files(tmp_path):
    planted = ["ckpt-00.safetensors", "ckpt-99.safetensors", "ckpt-notes.txt"]
    for name in planted:
        (tmp_path / name).write_text("not written by the callback")
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "ckpt-{epoch:02d}.safetensors"), max_to_keep=2, verbose=0
    )
    fit([ckpt], epochs=5)
    assert list_files(tmp_path) == sorted([*planted, "ckpt-04.safetensors", "ckpt-05.safetensors"])
    for name in planted:
        assert (tmp_path / name).read_text() == "not written by the callback"

    # A second fit with the same callback: its files are newer than the first fit's.
    fit([ckpt], epochs=7, initial_epoch=5)
    assert list_files(tmp_path) == sorted([*planted, "ckpt-06.safetensors", "ckpt-07.safetensors"])


def test_max_to_keep_counts_a_file_written_again_once(tmp_path):
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "ckpt" / "last.safetensors"), save_freq=2, max_to_keep=1
    )
    oracle = KerasOracle(tmp_path / "oracle")
    fit([ckpt, oracle], epochs=2)
    assert list_files(tmp_path / "ckpt") == ["last.safetensors"]
    assert_holds(tmp_path / "ckpt" / "last.safetensors", oracle.values("e2"))


def test_max_to_keep_with_save_best_only_keeps_the_best(tmp_path):
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "{epoch}.safetensors"), save_best_only=True, max_to_keep=2
    )
    history = fit([ckpt], epochs=4).history["val_loss"]
    # Each file saved is a new best, so the best two saved are the last two saved.
    improved = [i for i, v in enumerate(history) if v < min(history[:i], default=np.inf)]
    # More bests than max_to_keep (how many depends on the backend's numerics).
    assert len(improved) > 2
    assert list_files(tmp_path) == [f"{i + 1}.safetensors" for i in improved[-2:]]


# save_best_only with an integer save_freq ------------------------------------------------------


def test_keras_still_crashes_on_save_best_only_with_int_save_freq(tmp_path):
    """If this starts passing, Keras fixed its bug: compare ours with it in the parity tests."""
    ckpt = keras.callbacks.ModelCheckpoint(
        str(tmp_path / "b{batch}.keras"), monitor="loss", save_best_only=True, save_freq=1
    )
    with pytest.raises(TypeError, match="'NoneType' object is not callable"):
        fit([ckpt], epochs=1)


@pytest.mark.parametrize(
    ("monitor", "mode", "higher_is_better"),
    [("loss", "auto", False), ("loss", "min", False), ("accuracy", "auto", True)],
)
def test_save_best_only_with_int_save_freq_saves_each_new_best(
    tmp_path, monitor, mode, higher_is_better
):
    oracle = KerasOracle(tmp_path / "oracle", batches=True)
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "ckpt" / "e{epoch}b{batch}.safetensors"),
        monitor=monitor,
        mode=mode,
        save_best_only=True,
        save_freq=2,
        verbose=1,
    )
    fit([ckpt, oracle], epochs=3, steps_per_execution=1)
    sign = 1 if higher_is_better else -1
    expected, best, seen = [], None, 0
    for epoch, batch, logs in oracle.batch_logs:
        seen += 1
        if seen % 2:
            continue
        if best is None or sign * (logs[monitor] - best) > 0:
            best = logs[monitor]
            expected.append(f"e{epoch + 1}b{batch + 1}")
    assert len(expected) >= 2  # the case Keras crashes on
    assert list_files(tmp_path / "ckpt") == sorted(f"{n}.safetensors" for n in expected)
    for name in expected:
        assert_holds(tmp_path / "ckpt" / f"{name}.safetensors", oracle.values(name))
    assert ckpt.best == best


# tf.keras / R arguments -------------------------------------------------------------------------


@pytest.mark.parametrize("period", [2, 2.0, np.int64(2)])
def test_period_saves_every_n_epochs(tmp_path, period):
    ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), period=period)
    fit([ckpt], epochs=5)
    assert list_files(tmp_path) == ["2.safetensors", "4.safetensors"]
    assert ckpt.period == 2


def test_period_with_save_best_only_compares_every_nth_epoch(tmp_path, capsys):
    ckpt = fastckpt.ModelCheckpoint(
        str(tmp_path / "{epoch}.safetensors"), period=2, save_best_only=True, verbose=1
    )
    history = fit([ckpt], epochs=4).history["val_loss"]
    out = capsys.readouterr().out
    assert "Epoch 1:" not in out and "Epoch 3:" not in out
    expected = ["2.safetensors"] + (["4.safetensors"] if history[3] < history[1] else [])
    assert list_files(tmp_path) == expected


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(period=2, save_freq=10),
        dict(period=0),
        dict(period=-1),
        dict(period=1.5),
        dict(period=True),
        dict(period="2"),
        dict(max_to_keep=0),
        dict(max_to_keep=2.5),
        dict(threads=0),
        dict(filepath="gs://bucket/{epoch}.keras"),
    ],
    ids=repr,
)
def test_bad_fastckpt_arguments(kwargs):
    kwargs = {"filepath": "m.keras", **kwargs}
    with pytest.raises(ValueError, match="Received: "):
        fastckpt.ModelCheckpoint(**kwargs)


def test_options_is_accepted_with_a_warning_and_ignored(tmp_path):
    with pytest.warns(UserWarning, match="`options` has no effect"):
        ckpt = fastckpt.ModelCheckpoint(str(tmp_path / "{epoch}.safetensors"), options=object())
    fit([ckpt], epochs=1)
    assert list_files(tmp_path) == ["1.safetensors"]


def test_size_text():
    size_text = fastckpt_callbacks._size_text
    assert size_text(0) == "0 B"
    assert size_text(1023) == "1023 B"
    assert size_text(1024) == "1.00 KiB"
    assert size_text(int(1.02 * 2**30)) == "1.02 GiB"
    assert size_text(3 * 2**40) == "3.00 TiB"
