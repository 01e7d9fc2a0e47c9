"""Who gets the CPU while a checkpoint is written, read from the kernel (/proc): a background
save's writer threads run in SCHED_IDLE (they take only CPU time nothing else wants, so
training steps are not slowed), a synchronous save's helper threads at nice +10 relative to
the caller, and the caller's own thread is never changed.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import fastckpt
from children import state_model
from fastckpt import _fastckpt

SCHED_OTHER, SCHED_IDLE = 0, 5


def _threads() -> dict[int, tuple[str, int, int]]:
    """{tid: (name, policy, nice)} of this process's threads, from /proc/self/task."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue  # the thread ended
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        # Fields after the name, from `state` (3rd in proc(5)): nice is the 19th, policy the 41st.
        out[int(task.name)] = (name, int(fields[41 - 3]), int(fields[19 - 3]))
    return out


def _writers_while_saving(
    tmp_path, background: bool, threads: int | None = 2
) -> dict[int, tuple[str, int, int]]:
    """The threads a save started, seen while it runs (each payload write slowed down)."""
    model = state_model(1024)
    before = set(_threads())
    seen: dict[int, tuple[str, int, int]] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for tid, info in _threads().items():
                if tid not in before and tid != watcher_tid[0]:
                    seen[tid] = info
            done.wait(0.01)

    watcher_tid = [0]
    watcher = threading.Thread(target=watch)
    _fastckpt._inject_delay(100)
    try:
        watcher.start()
        watcher_tid[0] = watcher.native_id
        job = fastckpt.save(
            model, tmp_path / "ckpt.weights.h5", background=background, threads=threads
        )
        if background:
            job.result()
    finally:
        _fastckpt._inject_delay(0)
        done.set()
        watcher.join()
    return seen


def test_background_writers_run_on_idle_cpu_only(tmp_path):
    caller = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    seen = _writers_while_saving(tmp_path, background=True)
    writers = {tid: info for tid, info in seen.items() if info[0] == "fastckpt-writer"}
    assert len(writers) >= 2, f"expected the job's thread and its writers, saw {seen}"
    assert all(policy == SCHED_IDLE for _, policy, _ in writers.values()), writers
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == caller


def test_synchronous_helpers_run_at_nice_plus_ten(tmp_path):
    caller_nice = os.getpriority(os.PRIO_PROCESS, 0)
    seen = _writers_while_saving(tmp_path, background=False)
    assert seen, "the synchronous save started no helper threads"
    for tid, (name, policy, nice) in seen.items():
        assert (policy, nice) == (SCHED_OTHER, min(caller_nice + 10, 19)), (tid, name)
    assert os.getpriority(os.PRIO_PROCESS, 0) == caller_nice


def test_background_saves_default_to_a_quarter_of_the_cores(tmp_path):
    """One writer on this 2-core machine: a background writer only gets idle CPU, and two
    slowed training more than one (README, "Training while a checkpoint is written")."""
    cores = len(os.sched_getaffinity(0))
    assert _fastckpt.DEFAULT_BACKGROUND_THREADS == min(max(cores // 4, 1), 8)
    assert _fastckpt.DEFAULT_THREADS == min(cores, 8)
    n = _fastckpt.DEFAULT_BACKGROUND_THREADS
    seen = _writers_while_saving(tmp_path, background=True, threads=None)
    writers = [tid for tid, info in seen.items() if info[0] == "fastckpt-writer"]
    # The job's own thread writes when it is the only one; else it starts n writers.
    assert len(writers) == (1 if n == 1 else 1 + n), seen
    sync = _writers_while_saving(tmp_path, background=False, threads=None)
    assert len(sync) == _fastckpt.DEFAULT_THREADS, sync
