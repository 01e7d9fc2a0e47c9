"""Files in memory written again and again keep their mapping, seen from the kernel.

On tmpfs a callback's checkpoint is written into the file the save before the last one
replaced (or a file reserved for it), and the writer keeps a shared mapping of each such
file from one write to the next (`rust/core/src/io/mapped.rs`): the reservation touches
the file's pages through a mapping, and every later write of that file copies into it,
in the background too, with neither a new `mmap` nor a `pwrite` of the payloads. What
the tests check, with strace and `/proc/<pid>/maps` as the oracles: each file is mapped
once for all its writes; the payloads are not `pwrite`n; every file holds what Keras's
own `save_weights` writes; and no mapping outlives its use (training's end, the file's
removal, a forked child).
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest

import fastckpt
from fastckpt import _fastckpt, api, callbacks
from oracles import stock_arrays
from strace_log import fd_of, on_descriptor, run_traced, temp_name_re, write_size

FIT = textwrap.dedent(
    """
    import json, os, sys, time
    import keras, numpy as np
    import fastckpt
    from fastckpt import _fastckpt

    target, oracle, report, existing = sys.argv[1:5]

    # The inodes of the files in `folder` this process maps, and of those the folder has
    # (a mapping shows the name it was made under, so a file renamed since shows as
    # deleted: the inode says which file it is).
    def mapped_here(folder):
        with open("/proc/self/maps") as f:
            mapped = sorted({int(line.split()[4]) for line in f if folder in line})
        return mapped, sorted(e.inode() for e in os.scandir(folder))

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((256,)), keras.layers.Dense(1024), keras.layers.Dense(1024)]
    )
    model.compile(optimizer="adam", loss="mse")
    seen = []

    class Before(keras.callbacks.Callback):  # placed before the checkpoint callback
        def on_epoch_end(self, epoch, logs=None):
            ckpt._ready()
            for kept in ckpt._spares.values():  # every reserved file complete
                for spare in kept:
                    if spare.reserving is not None:
                        spare.reserving.wait(60)

    class After(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            ckpt.wait_until_finished()
            seen.append(mapped_here(os.path.dirname(target)))

    if existing == "existing":
        model.save_weights(target)  # a checkpoint there before training
    ckpt = fastckpt.ModelCheckpoint(target, save_weights_only=True, save_on_background=True)
    x = np.random.default_rng(0).random((64, 256), dtype=np.float32)
    y = np.random.default_rng(1).random((64, 1024), dtype=np.float32)
    model.fit(x, y, epochs=4, batch_size=16, verbose=0, callbacks=[Before(), ckpt, After()])
    model.save_weights(oracle)
    deadline = time.monotonic() + 30
    while _fastckpt.kept_mappings() and time.monotonic() < deadline:
        time.sleep(0.01)  # let go on a thread of their own once training has ended
    after = mapped_here(os.path.dirname(target))
    with open(report, "w") as f:
        json.dump({"during": seen, "after": after, "kept": _fastckpt.kept_mappings()}, f)
    """
)


@pytest.mark.parametrize("existing", ["new", "existing"])
def test_a_checkpoint_written_again_and_again_keeps_its_mapping(memory_folder, tmp_path, existing):
    """Four background saves of a fixed name on tmpfs: two files are reserved (a new
    file's first two saves), each mapped once, by its reservation; each is then written
    twice through that mapping, with only the metadata `pwrite`n. Where a checkpoint was
    there before training, one file is reserved, and the checkpoint the first save
    replaced is mapped once it is kept, for the second and the fourth saves. During
    training only the checkpoint and its spare are mapped (no removed file), nothing once
    training has ended, and the checkpoint holds Keras's own weights."""
    target = str(memory_folder / "c.weights.h5")
    oracle = str(tmp_path / "keras.weights.h5")
    report = tmp_path / "report.json"
    calls = run_traced(
        FIT,
        [target, oracle, str(report), existing],
        tmp_path / "strace.log",
        "openat,close,pwrite64,mmap",
    )
    temp_re = temp_name_re(target)
    opened = [c for c in calls if c.name == "openat" and temp_re.search(c.args) and c.ret[0] != "-"]
    assert opened, "no temp file was opened"
    mmaps, pwritten = 0, 0
    for o in opened:
        on_fd = on_descriptor(calls, o)
        pwritten += sum(write_size(c)[1] for c in on_fd if c.name == "pwrite64")
        # (`on_descriptor` goes by the first argument; a mapping's descriptor is its fifth.)
        fd = o.ret.split()[0]
        closes = (c for c in calls if c.name == "close" and fd_of(c) == int(fd))
        closed = next((c.start for c in closes if c.start > o.end), None)
        mmaps += sum(
            1
            for c in calls
            if c.name == "mmap"
            and "MAP_SHARED" in c.args
            and c.args.split(", ")[4] == fd
            and o.end < c.start < (closed or len(calls) * 10**6)
        )
    size = os.path.getsize(target)
    assert mmaps == 2, f"{mmaps} shared mappings of temp files: one per reserved file expected"
    assert pwritten < 0.05 * 4 * size, f"{pwritten} bytes pwritten over 4 saves of {size}"

    got = json.loads(report.read_text())
    for mapped, present in got["during"][1:]:  # (the first save's spare comes after it)
        assert len(mapped) == 2 and set(mapped) <= set(present), got["during"]
    assert got["after"][0] == [] and got["kept"] == 0, got
    for ours, keras_own in zip(
        stock_arrays(target, "weights_h5"), stock_arrays(oracle, "weights_h5"), strict=True
    ):
        np.testing.assert_array_equal(ours, keras_own)


def _mapped(path: str | os.PathLike[str], pid: int | str = "self") -> list[str]:
    with open(f"/proc/{pid}/maps") as f:
        return [line for line in f if str(path) in line]


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bfree * st.f_frsize


def test_the_mapping_of_a_removed_file_is_let_go_at_the_next_save(memory_folder):
    """A kept mapping holds its file's memory even once the file is removed (a user
    deleting a checkpoint): the next save lets it go, and the memory comes back."""
    length = 64 << 20
    target = memory_folder / "m.safetensors"
    spare, job = _fastckpt.reserve_spare(target, length)
    job.result()
    assert _mapped(spare), "the reservation keeps its mapping"
    free = _free_bytes(memory_folder)
    os.remove(spare)
    assert any("(deleted)" in line for line in _mapped(spare)), "still held"
    assert _free_bytes(memory_folder) < free + length // 2, "not freed while mapped"
    fastckpt.save(_model(8), memory_folder / "other.weights.h5")
    # The save looked: the mapping of a file with no name is let go.
    assert _mapped(spare) == []
    assert _free_bytes(memory_folder) >= free + length // 2, "the memory came back"


def test_release_lets_go_of_every_kept_mapping(memory_folder):
    spares = [_fastckpt.reserve_spare(memory_folder / f"{k}.weights.h5", 1 << 20) for k in "ab"]
    for path, job in spares:
        job.result()
        assert _mapped(path)
    assert _fastckpt.release_mappings() >= 2
    assert _fastckpt.kept_mappings() == 0
    assert all(_mapped(path) == [] for path, _ in spares)


def test_release_lets_go_of_the_mappings_of_the_files_named(memory_folder):
    """What a callback does when training ends: the mappings of its own checkpoints go,
    not those another `fit` has begun to keep."""
    (a, job_a), (b, job_b) = (
        _fastckpt.reserve_spare(memory_folder / f"{k}.weights.h5", 1 << 20) for k in "ab"
    )
    job_a.result()
    job_b.result()
    assert _fastckpt.release_mappings(callbacks._identities([a])) >= 1
    assert _mapped(a) == [] and _mapped(b)
    _fastckpt.release_mappings(callbacks._identities([b]))
    assert _mapped(b) == []


def test_a_forked_child_inherits_no_kept_mapping(memory_folder):
    """A kept mapping would hold its file's memory for as long as a child lives."""
    spare, job = _fastckpt.reserve_spare(memory_folder / "f.weights.h5", 4 << 20)
    job.result()
    assert _mapped(spare)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: reports what it has mapped, and whether it counts any
        os.close(read)
        os.write(write, json.dumps([_mapped(spare), _fastckpt.kept_mappings()]).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        mapped, kept = json.loads(f.read())
    os.waitpid(pid, 0)
    assert mapped == [] and kept == 0
    assert _mapped(spare), "the parent keeps its own"
    _fastckpt.release_mappings()


def _model(width: int) -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((width,)), keras.layers.Dense(width)])
    model.compile(optimizer="adam", loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


@pytest.mark.parametrize("cut", [0, 3 << 20])
def test_a_kept_file_cut_by_someone_else_is_written_whole(memory_folder, tmp_path, cut):
    """A kept file cut shorter behind the writer's back (a store past its end would raise
    SIGBUS) is written whole, and holds what Keras's own `save_weights` writes."""
    model = _model(1024)  # 12 MiB with Adam's slots
    target = memory_folder / "t.weights.h5"
    spare, job = _fastckpt.reserve_spare(target, api.plan_bytes(api.plan_for(model, True)))
    job.result()
    os.truncate(spare, cut)
    api.start_save(model, target, reuse=spare, keep_replaced=True).result()
    model.save_weights(tmp_path / "keras.weights.h5")
    for ours, keras_own in zip(
        stock_arrays(str(target), "weights_h5"),
        stock_arrays(str(tmp_path / "keras.weights.h5"), "weights_h5"),
        strict=True,
    ):
        np.testing.assert_array_equal(ours, keras_own)
    assert _mapped(target), "written through the kept mapping, kept again"
    _fastckpt.release_mappings()
