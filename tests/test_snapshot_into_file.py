"""A background save into a kept file in memory takes its snapshot straight into that file.

On tmpfs a callback's checkpoint is written into a file kept from an earlier save, through
a mapping the process keeps (`test_kept_mappings.py`). Once the layout of that target is
known (from the save before), the snapshot copies each large value to its place in that
mapping (`Snapshotter.into`, `_fastckpt.kept_region`), and the write copies none of them
(`rust/core/src/io/mapped.rs`). What the tests check: the saves after the first do take
their snapshot into the file; every checkpoint holds what Keras's own save writes at the
same step (h5py, and the zip's CRCs); a layout that moved since is written from copies;
and the writer refuses a payload that lies in the file it writes at another place.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

import fastckpt
from callback_support import h5_datasets, ready_spares
from fastckpt import _fastckpt, _snapshot, api, callbacks
from oracles import stock_arrays


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(512), keras.layers.Dense(256)]
    )
    model.compile(optimizer="adam", loss="mse")
    return model


@pytest.fixture
def takes(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Per snapshot, whether it was taken into a kept file: every value of the arena is
    then the very view of the file's memory it was asked to fill."""
    seen: list[bool] = []
    real = _snapshot.Snapshotter.take

    def take(self: Any, hold: bool = False, background: bool = False, into: Any = None) -> Any:
        snap = real(self, hold, background, into)
        seen.append(into is not None and all(snap.arrays[i] is v for i, v in into.items()))
        return snap

    monkeypatch.setattr(_snapshot.Snapshotter, "take", take)
    return seen


def _same(ours: str, keras_own: str, fmt: str) -> None:
    for a, b in zip(stock_arrays(ours, fmt), stock_arrays(keras_own, fmt), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("suffix", "fmt"), [(".weights.h5", "weights_h5"), (".keras", "keras")])
def test_a_callbacks_later_snapshots_go_straight_into_its_kept_file(
    memory_folder: Path, tmp_path: Path, takes: list[bool], suffix: str, fmt: str
) -> None:
    """Five background saves of a fixed name on tmpfs: the first learns the layout (its
    snapshot goes into the arena), every later one is taken into the kept file it writes
    into, and after each the checkpoint holds what Keras's own save writes then."""
    target = str(memory_folder / f"c{suffix}")
    model = _model()
    ckpt = fastckpt.ModelCheckpoint(
        target, save_weights_only=suffix == ".weights.h5", save_on_background=True
    )

    class Before(keras.callbacks.Callback):  # placed before the checkpoint callback
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            ready_spares(ckpt)

    class After(keras.callbacks.Callback):
        def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
            ckpt.wait_until_finished()
            oracle = str(tmp_path / f"keras-{epoch}{suffix}")
            if suffix == ".keras":
                self.model.save(oracle)
            else:
                self.model.save_weights(oracle)
            _same(target, oracle, fmt)

    x = np.random.default_rng(0).random((32, 256), dtype=np.float32)
    y = np.random.default_rng(1).random((32, 256), dtype=np.float32)
    # (Epochs of two steps: the last save of a `fit` lends the variables instead.)
    model.fit(x, y, epochs=6, batch_size=16, verbose=0, callbacks=[Before(), ckpt, After()])
    background = takes[:5]
    assert background[0] is False, "the first save cannot know the layout"
    assert all(background[1:]), f"snapshots taken into the file: {background}"


def test_a_backups_later_snapshots_go_straight_into_its_kept_file(
    memory_folder: Path, tmp_path: Path, takes: list[bool]
) -> None:
    """`BackupAndRestore` on tmpfs, a backup every epoch (each taken as the next epoch
    begins): the later ones are taken into the kept file, and each holds, at
    Keras's own paths, what Keras's `save_weights` writes at that step."""
    model = _model()
    backup = fastckpt.BackupAndRestore(
        str(memory_folder / "backup"), delete_checkpoint=False, save_on_background=True
    )
    checked: list[int] = []

    class After(keras.callbacks.Callback):  # placed after the backup callback
        def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
            if backup._job is None:
                return
            backup._wait()
            oracle = tmp_path / f"keras-{len(checked)}.weights.h5"
            self.model.save_weights(oracle)
            theirs, ours = h5_datasets(oracle), h5_datasets(Path(backup._weights_path))
            assert theirs
            for path, value in theirs.items():
                np.testing.assert_array_equal(ours[path], value, err_msg=path)
            checked.append(epoch)

    x = np.random.default_rng(0).random((32, 256), dtype=np.float32)
    model.fit(x, x[:, :256], epochs=6, batch_size=16, verbose=0, callbacks=[backup, After()])
    assert len(checked) == 5, checked
    background = takes[:5]
    assert all(background[2:]), f"snapshots taken into the file: {background}"


def _spare_after(job: api.SaveJob) -> str | None:
    """The file a finished save replaced, kept and mapped for the next one."""
    spare = callbacks._kept(job)
    if spare is None:
        return None
    if spare.reserving is not None:
        spare.reserving.result()
    return spare.path


def test_a_layout_that_moved_is_written_from_copies(
    memory_folder: Path, tmp_path: Path, takes: list[bool], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the places learnt no longer match the file's layout (its metadata grew), the
    values taken into the kept file are copied out and written to their new places: the
    file holds what Keras writes; the save after it learnt the places again."""
    model = _model()
    model.optimizer.build(model.trainable_variables)
    target = memory_folder / "m.weights.h5"
    spare = None
    for _ in range(3):  # the first files, and the layout learnt
        job = api.start_save(model, target, background=True, reuse=spare, keep_replaced=True)
        job.result()
        spare = _spare_after(job)
    assert spare is not None, "the replaced file is kept"
    snapper = _snapshot.snapshotter_for(api.plan_for(model, True))
    [placed] = snapper._placed.values()
    assert placed and min(placed.values()) >= 4096
    for index in placed:  # every value a page early: apart still, but not where it goes
        placed[index] -= 4096
    moved: list[bool] = []
    real = _snapshot.Snapshotter.placed

    def learn(self: Any, *args: Any) -> bool:
        moved.append(real(self, *args))
        return moved[-1]

    monkeypatch.setattr(_snapshot.Snapshotter, "placed", learn)

    for step in range(2):
        for v in model.trainable_variables:
            v.assign(v + 1.0)
        job = api.start_save(model, target, background=True, reuse=spare, keep_replaced=True)
        job.result()
        spare = _spare_after(job)
        model.save_weights(tmp_path / f"keras-{step}.weights.h5")
        _same(str(target), str(tmp_path / f"keras-{step}.weights.h5"), "weights_h5")
    assert takes[-2:] == [True, True] and moved == [True, False], (takes, moved)


def test_a_payload_in_the_file_but_not_at_its_place_is_refused(memory_folder: Path) -> None:
    """The writer's own check, whatever Python hands it: a value whose bytes lie in the
    kept file being written, at another place than its own, could be overwritten before
    it is read. The write fails naming it, and the checkpoint stays as it was."""
    target = memory_folder / "w.safetensors"
    first = np.arange(1 << 16, dtype=np.float32)
    planned = _fastckpt.plan_safetensors(target, [("w", first)], {})
    options = _fastckpt.WriteOptions(keep_replaced=True)
    _fastckpt.write([planned], options=options).result()
    job = _fastckpt.write(
        [_fastckpt.plan_safetensors(target, [("w", first + 1)], {})], options=options
    )
    report = job.result()
    kept = report.kept
    assert kept is not None
    mapping = _fastckpt.map_kept(kept, os.path.getsize(target))
    if mapping is not None:
        mapping.result()
    region = _fastckpt.kept_region(kept, 4096 + first.nbytes)  # (a little longer)
    assert region is not None, "a kept file in memory, mapped"
    memory = np.asarray(region)
    view = memory[4096 : 4096 + first.nbytes].view(np.float32)  # not where "w" goes
    view[...] = first * 3
    misplaced = _fastckpt.plan_safetensors(target, [("w", view)], {})
    with pytest.raises(ValueError, match=r"w: its bytes lie in the file being written"):
        _fastckpt.write(
            [misplaced], options=_fastckpt.WriteOptions(reuse=kept, keep_replaced=True)
        ).result()
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(target))["w"], first + 1)
    del view, memory, region
    _fastckpt.release_mappings()
