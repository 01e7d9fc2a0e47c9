"""Crash safety: a child process saves state A, B, A, B, ... to one path and is SIGKILLed at
a random moment. After every kill the file must open with the stock tools (the
`safetensors` package, h5py, `h5dump`, Keras's `load_weights` / `load_model`, `zipfile`'s
CRC check) and hold exactly state A or exactly state B, never a mix; what the killed save
left is a recognisable temp file that the next save into the folder removes.

The same harness run on Keras's own `save_weights` is the comparison: it writes the target in
place, so a kill during a save leaves a torn file.

Default suite: 6 kills per format (24). `-m slow`: 55 per format (220).
"""

from __future__ import annotations

import collections
import os
import random
import re
import signal
import time

import pytest

import fastckpt
from children import SUFFIXES
from fastckpt._fastckpt import is_temp_name
from oracles import check_target, model_states

FORMATS = list(SUFFIXES)


def _temps_of(folder: str, target: str) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n != os.path.basename(target))


def kill_rounds(forkserver, folder, fmt, kills, rng, model, states, writer="fastckpt"):
    """`kills` rounds of: start a saving child, wait until it has saved once, kill it at a
    random moment, check the file. Returns one record per kill."""
    target = os.path.join(folder, "ckpt" + SUFFIXES[fmt])
    records = []
    leftover: list[str] = []
    for _ in range(kills):
        child = forkserver.start("crash_loop", path=target, writer=writer)
        ready = child.expect("ready", timeout=180)
        if writer == "fastckpt":
            # The child's first save swept the temp files of the child killed before it.
            still = [n for n in leftover if os.path.exists(os.path.join(folder, n))]
            assert not still, f"temp files of a dead writer survived the next save: {still}"
        time.sleep(rng.uniform(0, max(0.3, 3 * ready["seconds"])))
        child.kill(signal.SIGKILL)
        assert child.wait_exit(60) == {"signal": signal.SIGKILL}
        temps = _temps_of(folder, target)
        if writer == "fastckpt":
            for name in temps:
                assert is_temp_name(name), f"unexpected file after a kill: {name}"
                assert re.search(rf"\.fastckpt-[0-9a-f]{{8}}-{child.pid}-\d+\.tmp$", name), name
            leftover = temps
        saves = len(child.events_named("saved")) + 1
        try:
            outcome = check_target(target, fmt, model, states)
        except Exception as e:
            if writer == "fastckpt":
                raise AssertionError(
                    f"{fmt}: after a kill (pid {child.pid}, {saves} saves done, temps "
                    f"{temps}) the checkpoint is not one complete state: {e!r}"
                ) from e
            outcome = f"torn ({type(e).__name__})"
        records.append({"format": fmt, "state": outcome, "mid_write": bool(temps), "saves": saves})
    if writer == "fastckpt" and leftover:
        fastckpt.save(model, target)  # the next save into the folder, from this process
        still = [n for n in leftover if os.path.exists(os.path.join(folder, n))]
        assert not still, f"temp files of a dead writer survived the next save: {still}"
    return records


def _summary(records) -> str:
    by = collections.defaultdict(collections.Counter)
    for r in records:
        by[r["format"]][r["state"]] += 1
        by[r["format"]]["mid-write kills"] += r["mid_write"]
    return "; ".join(f"{fmt}: {dict(c)}" for fmt, c in by.items())


def _run(forkserver, tmp_path, kills_per_format, seed):
    rng = random.Random(seed)
    model, states = model_states(1024)
    records = []
    for fmt in FORMATS:
        folder = tmp_path / fmt
        folder.mkdir()
        records += kill_rounds(forkserver, str(folder), fmt, kills_per_format, rng, model, states)
    print(f"\n{len(records)} kills: {_summary(records)}")
    assert all(r["state"] in ("A", "B") for r in records)
    # The kills must really land inside saves, not only between them.
    mid = sum(r["mid_write"] for r in records)
    assert mid >= 1, f"none of {len(records)} kills landed while a temp file existed"
    return records


def test_sigkill_at_random_moments_never_tears_a_checkpoint(forkserver, tmp_path):
    _run(forkserver, tmp_path, kills_per_format=6, seed=20240611)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_tears_a_checkpoint_long(forkserver, tmp_path):
    _run(forkserver, tmp_path, kills_per_format=55, seed=int(time.time()))


@pytest.mark.slow  # about Keras, not fastckpt, and timing-dependent: opt-in, not in CI
def test_keras_save_weights_under_the_same_harness(forkserver, tmp_path):
    """The comparison figure: Keras's own `save_weights` writes the target in place (h5py
    truncates it first), so kills during its saves leave files that hold neither state."""
    rng = random.Random(7)
    model, states = model_states(1024)
    records = kill_rounds(
        forkserver, str(tmp_path), "weights_h5", 12, rng, model, states, writer="keras"
    )
    print(f"\nKeras save_weights, {len(records)} kills: {_summary(records)}")
    torn = [r for r in records if r["state"] not in ("A", "B")]
    assert torn, "no kill tore Keras's file this time (see the figures above)"
