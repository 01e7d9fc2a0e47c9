"""Many processes: `keras.distribution` over `jax.distributed`, 2 local CPU processes
(gloo, 127.0.0.1 only), each running distributed_worker.py as a user's script would run
on each host. Checked against the system and the stock tools: which process renamed files
into the checkpoint folder (`strace -f` of each), the files as Keras and `safetensors`
read them, what every process restored, and what a failure on process 0 does.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import safetensors.numpy

from fastckpt._fastckpt import is_temp_name

WORKER = Path(__file__).with_name("distributed_worker.py")
# `rename("from", "to")`, or `renameat2(AT_FDCWD, "from", AT_FDCWD, "to", ...)`.
RENAME = re.compile(r'^\d+\s+rename\w*\((?:\w+, )?"([^"]+)", (?:\w+, )?"([^"]+)"', re.M)


def traced(trace: Path, script: Path, *args: str) -> list[str]:
    """The command that runs `script` under `strace -f`, its renames logged to `trace`."""
    strace = ["strace", "-f", "-qq", "-e", "trace=rename,renameat,renameat2", "-o", str(trace)]
    return [*strace, sys.executable, str(script), *args]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_pair(scenario: str, folder: Path, tmp_path: Path) -> tuple[list[list[dict]], list[str]]:
    """Runs both processes of `scenario`; their events, and the files each renamed into
    place (from its strace)."""
    port = free_port()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs, traces = [], []
    for process in (0, 1):
        trace = tmp_path / f"{scenario.replace(' ', '-')}-{process}.strace"
        traces.append(trace)
        procs.append(
            subprocess.Popen(
                traced(trace, WORKER, scenario, str(process), str(port), str(folder)),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )
        )
    events, renamed = [], []
    for proc, trace in zip(procs, traces, strict=True):
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
        events.append([json.loads(line) for line in out.splitlines() if line.startswith("{")])
        renamed.append(
            [m.group(2) for m in RENAME.finditer(trace.read_text()) if str(folder) in m.group(2)]
        )
    return events, renamed


def named(events: list[dict], name: str) -> list[dict]:
    return [e for e in events if e["event"] == name]


def run_pair_into_ckpt(tmp_path_factory, scenario: str) -> tuple[Path, list, list]:
    """`scenario` run once for the module, its checkpoints in a fresh `ckpt` folder."""
    tmp = tmp_path_factory.mktemp(scenario)
    folder = tmp / "ckpt"
    folder.mkdir()
    events, renamed = run_pair(scenario, folder, tmp)
    return folder, events, renamed


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    return run_pair_into_ckpt(tmp_path_factory, "fit")


def test_process_0_writes_every_checkpoint_and_process_1_none(fitted):
    folder, events, renamed = fitted
    assert renamed[1] == [], "process 1 wrote checkpoint files"
    written = sorted({os.path.relpath(p, folder) for p in renamed[0]})
    assert written == [
        "best.keras",
        "epochs/1.weights.h5",
        "epochs/2.weights.h5",
        "epochs/3.weights.h5",
        "plain.safetensors",
    ]
    # max_to_keep=2: the first epoch's file is gone, deleted once (by process 0).
    on_disk = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert on_disk == [
        "best.keras",
        "epochs/2.weights.h5",
        "epochs/3.weights.h5",
        "plain.safetensors",
    ]
    assert not any(is_temp_name(p.name) for p in folder.rglob("*"))
    for process in events:
        assert named(process, "done"), process


def test_every_process_restores_what_process_0_wrote(fitted):
    _, events, _ = fitted
    trained = [named(e, "trained")[0]["digest"] for e in events]
    loaded = [named(e, "loaded")[0]["digest"] for e in events]
    assert trained[0] == trained[1], "the processes trained apart"
    assert loaded == trained


def test_the_files_are_what_the_stock_readers_see(fitted):
    folder, _, _ = fitted
    tensors = safetensors.numpy.load_file(str(folder / "plain.safetensors"))
    with h5py.File(folder / "epochs" / "3.weights.h5") as f:
        kernel = f["layers/dense/vars/0"][()]
    # The last epoch's file and the save after `fit` hold the same state.
    np.testing.assert_array_equal(kernel, tensors["layers/dense/vars/0"])
    assert kernel.shape == (8, 16)


def test_a_backup_is_restored_by_every_process_and_resumes_exactly(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    events, renamed = run_pair("interrupted", folder, tmp_path)
    assert all(named(e, "interrupted") for e in events)
    assert renamed[1] == []
    assert {os.path.basename(p) for p in renamed[0]} == {
        "latest.weights.h5",
        "training_metadata.json",
    }
    meta = json.loads((folder / "backup" / "training_metadata.json").read_text())
    assert meta["epoch"] == 2
    resumed, renamed = run_pair("resumed", folder, tmp_path)
    assert renamed[1] == []
    for process in resumed:
        assert [e["epoch"] for e in named(process, "epoch")] == [2]
    reference, _ = run_pair("uninterrupted", tmp_path / "none", tmp_path)
    digests = {named(e, "trained")[0]["digest"] for e in resumed + reference}
    assert len(digests) == 1, "the resumed run differs from the uninterrupted one"
    assert not (folder / "backup").exists(), "delete_checkpoint: removed once, by process 0"


def test_a_failed_write_on_process_0_fails_the_save_on_every_process(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    events, _ = run_pair("failed write", folder, tmp_path)
    raised = [named(e, "raised") for e in events]
    assert raised[0] and raised[0][0]["type"] == "OSError", raised
    assert raised[1] and raised[1][0]["type"] == "CheckpointError", raised
    assert "process 0 could not write" in raised[1][0]["message"]
    # The previous file (the save before training) is intact: it loads, with its step.
    before = safetensors.numpy.load_file(str(folder / "plain.safetensors"))
    assert int(before["optimizer/vars/0"]) == 0
    assert not [p for p in folder.iterdir() if is_temp_name(p.name)]


def test_a_variable_split_over_processes_is_refused_by_a_one_writer_format(tmp_path):
    events, renamed = run_pair("model parallel", tmp_path, tmp_path)
    for process in events:
        (raised,) = named(process, "raised")
        assert raised["type"] == "ValueError"
        assert raised["message"].startswith("layers/dense/vars/0: sharded over 2 processes")
        assert "`.shards.json`" in raised["message"]
    assert renamed == [[], []]


# Every process writes its parts: `.shards.json` ------------------------------------------


def parts_of(folder: Path, index: str) -> list[str]:
    """The part files of the set `index` names (from the index, as written)."""
    document = json.loads((folder / index).read_text())
    return sorted({p["file"] for t in document["tensors"].values() for p in t["parts"]})


@pytest.fixture(scope="module")
def parts_fit(tmp_path_factory):
    return run_pair_into_ckpt(tmp_path_factory, "parts")


def test_each_process_writes_the_parts_it_holds_and_process_0_the_index(parts_fit):
    folder, events, renamed = parts_fit
    assert named(events[0], "trained")[0]["split"] == ["sequential/hidden/kernel"]
    parts = parts_of(folder, "model.shards.json")
    assert [p.rsplit("-", 3)[-3:] for p in parts] == [
        ["00000", "of", "00002.safetensors"],
        ["00001", "of", "00002.safetensors"],
    ]
    names = [[os.path.basename(p) for p in r] for r in renamed]
    # Each process renamed its own part into place, and only process 0 an index; two
    # epochs' checkpoints are kept (max_to_keep=2), each a set of its own.
    assert parts[1] in names[1] and parts[0] not in names[1]
    assert not any(n.endswith(".shards.json") for n in names[1])
    assert "model.shards.json" in names[0] and parts[0] in names[0]
    assert sorted(os.listdir(folder / "epochs")) == sorted(
        [
            "2.shards.json",
            "3.shards.json",
            *parts_of(folder / "epochs", "2.shards.json"),
            *parts_of(folder / "epochs", "3.shards.json"),
        ]
    )
    # The split kernel is in both parts, a half each; the stock reader reads them.
    halves = [safetensors.numpy.load_file(str(folder / p)) for p in parts]
    kernel = [k for h in halves for k in h if k.startswith("layers/dense/vars/0[")]
    assert sorted(kernel) == ["layers/dense/vars/0[0:8,0:8]", "layers/dense/vars/0[0:8,8:16]"]
    trained = np.load(folder / "trained.npz")["arr_0"]
    together = np.concatenate(
        [h[k] for h in halves for k in sorted(h) if k.startswith("layers/dense/vars/0[")],
        axis=1,
    )
    np.testing.assert_array_equal(together, trained)


def test_every_process_restores_a_parts_checkpoint_under_any_layout(parts_fit):
    _, events, _ = parts_fit
    for process in events:
        trained = named(process, "trained")[0]["digest"]
        loaded = {e["layout"]: e["digest"] for e in named(process, "loaded")}
        assert loaded == {"model parallel": trained, "data parallel": trained}


def test_a_parts_checkpoint_loads_in_one_process_and_converts_for_stock_keras(parts_fit, tmp_path):
    """In one process (this one, TensorFlow), the parts are assembled into each value; the
    file converted to `.weights.h5` loads with Keras's own `load_weights`."""
    import keras

    import fastckpt

    folder, _, _ = parts_fit
    trained = np.load(folder / "trained.npz")
    trained = [trained[f"arr_{i}"] for i in range(len(trained.files))]

    def model():
        keras.utils.set_random_seed(1)
        m = keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(16, name="hidden"), keras.layers.Dense(1)]
        )
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        m.optimizer.build(m.trainable_variables)
        return m

    def values(m):
        return [v.numpy() for v in [*m.variables, *m.optimizer.variables]]

    ours = model()
    fastckpt.load(ours, folder / "model.shards.json")
    fastckpt.convert(folder / "model.shards.json", tmp_path / "model.weights.h5")
    stock = model()
    stock.load_weights(tmp_path / "model.weights.h5")
    for m in (ours, stock):
        for got, want in zip(values(m), trained, strict=True):
            np.testing.assert_array_equal(got, want.astype(got.dtype))


@pytest.mark.parametrize("how", ["failed", "killed"])
def test_a_process_failing_mid_save_leaves_the_previous_set_whole(tmp_path, how):
    """Process 1's write fails (an injected fdatasync error), or process 1 is killed while
    it writes: no new index is committed, and every process restores the set saved
    before, bit for bit."""
    folder = tmp_path / "run"
    folder.mkdir()
    if how == "failed":
        events, _ = run_pair("parts failed", folder, tmp_path)
        raised = [named(e, "raised") for e in events]
        assert raised[1] and raised[1][0]["type"] == "OSError", raised
        assert raised[0] and raised[0][0]["type"] == "CheckpointError", raised
        assert "process(es) [1] could not write their parts" in raised[0][0]["message"]
    else:
        kill_process_1_mid_save("parts killed", folder, tmp_path)
    before = parts_of(folder, "model.shards.json")
    restored, _ = run_pair("parts restored", folder, tmp_path)
    want = np.load(folder / "before.npz")
    got = np.load(folder / "restored-0.npz")
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name])
    assert named(restored[0], "loaded")[0]["digest"] == named(restored[1], "loaded")[0]["digest"]
    assert parts_of(folder, "model.shards.json") == before
    assert not [p for p in folder.iterdir() if is_temp_name(p.name)] or how == "killed"


def kill_process_1_mid_save(scenario: str, folder: Path, tmp_path: Path) -> None:
    """Runs `scenario`, kills process 1 once it has begun writing its part of the second
    save (its writes are slowed), and ends process 0 as the job would end."""
    import time

    port = free_port()
    env = {**os.environ, "KERAS_BACKEND": "jax", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), scenario, str(p), str(port), str(folder)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        for p in (0, 1)
    ]
    try:
        for line in procs[1].stdout:
            if '"saving"' in line:
                break
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not [
            p for p in folder.iterdir() if is_temp_name(p.name)
        ]:
            time.sleep(0.01)
        time.sleep(0.2)
        procs[1].kill()
        procs[1].wait(timeout=30)
        try:
            # It waits for process 1 in a collective until JAX's coordination service
            # gives up on it; a job scheduler ends the job first.
            procs[0].wait(timeout=5)
        except subprocess.TimeoutExpired:
            procs[0].kill()
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            assert proc.stdout is not None
            proc.stdout.close()


def test_mirrored_strategy_saves_each_variable_once_and_restores_under_it(tmp_path):
    trace = tmp_path / "mirrored.strace"
    out = subprocess.run(
        traced(trace, WORKER.with_name("mirrored_worker.py"), str(tmp_path)),
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.splitlines()[-1])
    assert report == {
        "replicas": 2,
        "restored_under_strategy": True,
        "stock_keras_reads_it": True,
        "iterations": 8,
    }
    renamed = [m.group(2) for m in RENAME.finditer(trace.read_text())]
    assert renamed.count(str(tmp_path / "mirrored.weights.h5")) == 2  # once an epoch
    with h5py.File(tmp_path / "mirrored.weights.h5") as f:
        assert f["layers/dense/vars/0"].shape == (8, 16)  # one copy, not one a replica


def test_processes_agree_on_process_0s_value_to_the_last_bit(tmp_path):
    # (JAX without x64 would round a float64 broadcast to float32.)
    events, _ = run_pair("agree", tmp_path, tmp_path)
    assert [named(e, "agreed")[0]["value"] for e in events] == [(0.1234567890123456789).hex()] * 2
