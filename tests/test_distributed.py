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


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    folder = tmp / "ckpt"
    folder.mkdir()
    events, renamed = run_pair("fit", folder, tmp)
    return folder, events, renamed


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


def test_a_variable_split_over_processes_is_refused_on_every_process(tmp_path):
    events, renamed = run_pair("model parallel", tmp_path, tmp_path)
    for process in events:
        (raised,) = named(process, "raised")
        assert raised["type"] == "NotImplementedError"
        assert raised["message"].startswith("layers/dense/vars/0: sharded over 2 processes")
    assert renamed == [[], []]


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
