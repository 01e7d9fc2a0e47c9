"""Resume after any failure, exactly: a training run killed at a random step (SIGKILL) or
preempted (SIGTERM), then started again with the same script, ends bit-identical to a run
that was never interrupted: the final weights and optimizer state, and every file its
`ModelCheckpoint`s wrote (names and contents, read with h5py, the `safetensors` package and
zipfile). The runs are child processes of the fork server (`forkserver.py`): the model,
data and schedule are `children.resume_training`'s.

`-m slow` runs hundreds of kills; the default suite runs 20.
"""

from __future__ import annotations

import io
import os
import random
import signal
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from callback_support import assert_arrays_identical, h5_datasets
from fastckpt._fastckpt import is_temp_name

EPOCHS = 4
STEPS = 6  # 48 samples, batches of 8
KILLS = int(os.environ.get("FASTCKPT_RESUME_KILLS", "20"))


def run_to_end(forkserver, folder: Path, **args) -> None:
    child = forkserver.start("resume_training", folder=str(folder), epochs=EPOCHS, **args)
    status = child.wait_exit(timeout=300)
    assert status == {"code": 0}, child.seen[-5:]


def files_of(folder: Path) -> dict[str, dict[str, np.ndarray]]:
    """Every checkpoint file a run left, by name, as the stock readers see it."""
    out: dict[str, dict[str, np.ndarray]] = {}
    deadline = time.monotonic() + 10
    while any(is_temp_name(p.name) for p in folder.rglob("*")) and time.monotonic() < deadline:
        time.sleep(0.02)  # kept files go away on a thread of their own after training
    for path in sorted(folder.rglob("*")):
        if not path.is_file():
            continue
        name = str(path.relative_to(folder))
        assert not is_temp_name(path.name), f"left behind: {name}"
        if name.endswith(".weights.h5"):
            out[name] = h5_datasets(path)
        elif name.endswith(".safetensors"):
            out[name] = safetensors.numpy.load_file(str(path))
        elif name.endswith(".keras"):
            with zipfile.ZipFile(path) as zf:
                out[name] = h5_datasets(io.BytesIO(zf.read("model.weights.h5")))
        else:
            out[name] = {"bytes": np.frombuffer(path.read_bytes(), np.uint8)}
    return out


def assert_same_run(ours: Path, reference: Path, how: str = "") -> None:
    a, b = files_of(ours), files_of(reference)
    assert sorted(a) == sorted(b), f"{how}: the runs left different files"
    differ = []
    for name in a:
        try:
            assert_arrays_identical(a[name], b[name])
        except AssertionError as e:
            differ.append(f"{name}: {e}")
    assert not differ, f"{how}: the runs' files differ: " + "; ".join(differ)


@pytest.fixture(scope="module")
def references(forkserver, tmp_path_factory):
    """The uninterrupted runs, one per backup schedule."""
    out = {}
    for freq in ("epoch", 1):
        folder = tmp_path_factory.mktemp(f"reference-{freq}")
        run_to_end(forkserver, folder, backup_freq=freq)
        out[freq] = folder
    return out


def test_the_reference_runs_leave_what_the_schedule_says(references):
    names = sorted(files_of(references["epoch"]))
    assert "final.weights.h5" in names and "best.safetensors" in names
    # Every 3 batches (6 an epoch), the last 3 kept.
    assert [n for n in names if n.startswith("ckpt/")] == [
        "ckpt/3-6.weights.h5",
        "ckpt/4-3.weights.h5",
        "ckpt/4-6.weights.h5",
    ]
    assert [n for n in names if n.startswith("epochs/")] == [
        f"epochs/{e}.keras" for e in (1, 2, 3, 4)
    ]
    assert not any(n.startswith("backup/") for n in names), "delete_checkpoint removes it"


def _kill_and_resume(forkserver, folder: Path, rng: random.Random, freq) -> int:
    child = forkserver.start("resume_training", folder=str(folder), epochs=EPOCHS, backup_freq=freq)
    at = rng.randrange(1, EPOCHS * STEPS)
    for _ in range(at):
        child.expect("step", timeout=120)
    time.sleep(rng.random() * 0.05)  # land anywhere in the next step or a write
    child.kill(signal.SIGKILL)
    status = child.wait_exit(timeout=60)
    assert status in ({"signal": signal.SIGKILL}, {"code": 0}), status
    run_to_end(forkserver, folder, backup_freq=freq)
    return at


@pytest.mark.parametrize("freq", ["epoch", 1])
def test_killed_at_random_steps_then_resumed_ends_bit_identical(
    forkserver, references, tmp_path, freq
):
    rng = random.Random(f"kills-{freq}")
    for i in range(KILLS // 2):
        folder = tmp_path / f"kill{i}"
        at = _kill_and_resume(forkserver, folder, rng, freq)
        assert_same_run(folder, references[freq], f"killed after step {at}")


@pytest.mark.slow
@pytest.mark.parametrize("freq", ["epoch", 1, 2])
def test_hundreds_of_kills(forkserver, references, tmp_path, freq):
    reference = references.get(freq)
    if reference is None:
        reference = tmp_path / "reference"
        run_to_end(forkserver, reference, backup_freq=freq)
    rng = random.Random(f"many-{freq}")
    for i in range(100):
        folder = tmp_path / f"kill{i}"
        at = _kill_and_resume(forkserver, folder, rng, freq)
        assert_same_run(folder, reference, f"killed after step {at}")


def test_sigterm_backs_up_the_current_step_and_ends_as_the_signal_would(
    forkserver, references, tmp_path
):
    child = forkserver.start(
        "resume_training",
        folder=str(tmp_path),
        epochs=EPOCHS,
        backup_freq=False,  # no periodic backup: only the one on preemption
        step_delay=0.05,
    )
    for _ in range(STEPS + 3):  # inside the second epoch
        child.expect("step", timeout=120)
    os.kill(child.pid, signal.SIGTERM)
    status = child.wait_exit(timeout=60)
    assert status == {"signal": signal.SIGTERM}, status
    steps = child.events_named("step")
    meta = (tmp_path / "backup" / "training_metadata.json").read_text()
    assert '"epoch": 1' in meta, meta
    assert len(steps) >= STEPS + 3
    run_to_end(forkserver, tmp_path, backup_freq=False)
    assert_same_run(tmp_path, references["epoch"])


def test_a_step_that_outlasts_the_grace_period_ends_as_the_signal_would(forkserver, tmp_path):
    child = forkserver.start(
        "resume_training",
        folder=str(tmp_path),
        epochs=2,
        backup_freq=False,
        step_delay=600.0,  # the first step never ends
        grace_period=0.5,
    )
    child.expect("step", timeout=120)
    os.kill(child.pid, signal.SIGTERM)
    assert child.wait_exit(timeout=60) == {"signal": signal.SIGTERM}
    assert not (tmp_path / "backup").exists(), "no step ended: there was nothing to back up"


def test_save_freq_false_makes_no_periodic_backup(forkserver, tmp_path):
    child = forkserver.start(
        "resume_training", folder=str(tmp_path), epochs=2, backup_freq=False, preemption=False
    )
    for _ in range(STEPS + 2):
        child.expect("step", timeout=120)
    child.kill(signal.SIGKILL)
    child.wait_exit(timeout=60)
    assert not (tmp_path / "backup").exists() or not list((tmp_path / "backup").iterdir())
