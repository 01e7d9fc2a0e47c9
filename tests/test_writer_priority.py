"""Who gets the CPU while a checkpoint is written, read from the kernel (/proc): a background
save's writer threads run at the lowest priority, nice 19 (training keeps its cores, and
the write still ends while training runs), and use a quarter of the cores until someone
waits for them, then every core; a synchronous save, which its caller waits for, runs at
the caller's priority on every core; the caller's own thread is never changed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fastckpt
from children import state_model
from fastckpt import _fastckpt
from fastckpt._fastckpt import testing

SCHED_OTHER = 0


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


def _bytes_written_by_thread() -> dict[int, int]:
    """{tid: bytes the thread has passed to write syscalls} (`wchar` in /proc/.../io)."""
    out = {}
    for task in Path("/proc/self/task").iterdir():
        try:
            io = (task / "io").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out[int(task.name)] = int(io.split("wchar:")[1].split()[0])
    return out


def _writers_while_saving(
    tmp_path, background: bool, threads: int | None = 2, name: str = "ckpt.weights.h5", **kw
) -> dict[int, tuple[str, int, int]]:
    """The threads a save started, as first seen while it runs (each payload write slowed
    down), before anyone waits for a background one."""
    model = state_model(1024)
    before = set(_threads())
    seen: dict[int, tuple[str, int, int]] = {}
    done = threading.Event()
    waited = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for tid, info in _threads().items():
                if tid not in before and tid != threading.get_native_id():  # (not itself)
                    # As last seen before anyone waited (a wait changes the priority).
                    if not waited.is_set() or tid not in seen:
                        seen[tid] = info
            done.wait(0.01)

    watcher = threading.Thread(target=watch)
    testing.inject_delay(100)
    try:
        watcher.start()
        job = fastckpt.save(model, tmp_path / name, background=background, threads=threads, **kw)
        if background:
            # Every writer seen before the wait (which changes their priority): the job's
            # thread, at nice 19, may take a while to start them on a busy machine.
            want = _fastckpt.DEFAULT_THREADS if threads is None else threads
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                if sum(info[0] == "fastckpt-writer" for info in list(seen.values())) >= want:
                    break
                time.sleep(0.01)
            done.wait(0.05)  # (a new thread lowers its own priority once it runs)
            waited.set()
            job.result()
    finally:
        testing.inject_delay(0)
        done.set()
        watcher.join()
    return seen


def test_background_writers_run_at_the_lowest_priority(tmp_path):
    caller = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    seen = _writers_while_saving(tmp_path, background=True)
    writers = {tid: info for tid, info in seen.items() if info[0] == "fastckpt-writer"}
    assert len(writers) >= 2, f"expected the job's thread and its writers, saw {seen}"
    assert all((policy, nice) == (SCHED_OTHER, 19) for _, policy, nice in writers.values()), writers
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == caller


def test_synchronous_helpers_run_at_the_callers_priority(tmp_path):
    caller = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    seen = _writers_while_saving(tmp_path, background=False)
    assert seen, "the synchronous save started no helper threads"
    for tid, (name, policy, nice) in seen.items():
        assert (policy, nice) == caller, (tid, name)
    assert (os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)) == caller


def test_a_synchronous_sharded_save_runs_at_the_callers_priority(tmp_path):
    """Shards and index are one synchronous write: no thread of it runs at a background
    writer's priority (they once were background jobs, even for a synchronous save)."""
    caller = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    seen = _writers_while_saving(
        tmp_path, background=False, name="ckpt.weights.json", max_shard_size=0.004
    )
    assert seen, "the synchronous save started no helper threads"
    for tid, (name, policy, nice) in seen.items():
        assert (policy, nice) == caller, (tid, name)
    assert len(os.listdir(tmp_path)) >= 4, "an index and at least three shards"


def _watch_a_waited_save(
    tmp_path, look: Callable[[bool], None], started: Callable[[], bool] = lambda: True
) -> None:
    """Runs a slowed one-thread background save and waits for it once `started()` (within
    10 s: its thread, at nice 19, may start late) and a moment more, with a watcher
    calling `look(waited)` every 5 ms meanwhile (`waited`: whether `result()` was called)."""
    model = state_model(1024)
    waiting = threading.Event()
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            look(waiting.is_set())
            done.wait(0.005)

    testing.inject_delay(150)  # ~6 pieces: about 1 s on one thread
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        job = fastckpt.save(model, tmp_path / "ckpt.weights.h5", background=True, threads=1)
        deadline = time.monotonic() + 10
        while not started() and time.monotonic() < deadline:
            time.sleep(0.01)
        done.wait(0.2)
        assert not job.done(), "the slowed save ended before the wait: nothing measured"
        waiting.set()
        job.result()
    finally:
        testing.inject_delay(0)
        done.set()
        watcher.join()


def test_a_background_save_takes_every_core_once_waited_for(tmp_path):
    """Until someone waits, one thread writes (on this machine's default); after `wait()`,
    as many as a synchronous save uses. Seen as which threads' write counters grow."""
    if _fastckpt.DEFAULT_THREADS < 2:
        raise AssertionError("needs at least 2 cores to tell the widths apart")
    before = set(_threads())
    wrote_by: dict[int, int] = {}  # tid -> bytes written while the save ran
    writers_before_wait: set[int] = set()

    def look(waited: bool) -> None:
        for tid, grown in _bytes_written_by_thread().items():
            if tid not in before and grown > 0:
                wrote_by[tid] = grown
                if not waited:
                    writers_before_wait.add(tid)

    _watch_a_waited_save(tmp_path, look, started=lambda: bool(writers_before_wait))
    assert len(writers_before_wait) == 1, writers_before_wait
    assert len(wrote_by) == _fastckpt.DEFAULT_THREADS, wrote_by


def test_background_saves_default_to_a_quarter_of_the_cores(tmp_path):
    """One writer on this 2-core machine until the write is waited for (README, "Training
    while a checkpoint is written")."""
    cores = len(os.sched_getaffinity(0))
    assert _fastckpt.DEFAULT_BACKGROUND_THREADS == min(max(cores // 4, 1), 8)
    assert _fastckpt.DEFAULT_THREADS == min(cores, 8)
    seen = _writers_while_saving(tmp_path, background=True, threads=None)
    writers = [tid for tid, info in seen.items() if info[0] == "fastckpt-writer"]
    # The job's own thread is one of the writers; the others wait to be hurried.
    assert len(writers) == _fastckpt.DEFAULT_THREADS, seen
    sync = _writers_while_saving(tmp_path, background=False, threads=None)
    # The caller's own thread writes too.
    assert len(sync) == _fastckpt.DEFAULT_THREADS - 1, sync


def _may_raise_priority() -> bool:
    """Whether a thread of this process may lower its nice value again (CAP_SYS_NICE, or
    a RLIMIT_NICE that allows it), tried on a thread of its own."""
    result = []

    def attempt() -> None:
        os.setpriority(os.PRIO_PROCESS, 0, 19)
        try:
            os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, os.getpid()))
            result.append(os.getpriority(os.PRIO_PROCESS, 0) != 19)
        except PermissionError:
            result.append(False)

    thread = threading.Thread(target=attempt)
    thread.start()
    thread.join()
    return result[0]


def test_a_background_save_waited_for_returns_to_the_callers_priority(tmp_path):
    """Training waits then: a writer left at nice 19 would get almost nothing of a core
    another process keeps busy. Where the process may raise a thread's priority again, the
    writer threads of a waited save run at the caller's nice value; where it may not, they
    stay at 19 (and only more of them help)."""
    caller = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(_threads())
    seen_before_wait: dict[int, int] = {}
    seen_after_wait: dict[int, int] = {}

    def look(waited: bool) -> None:
        for tid, (name, _, nice) in _threads().items():
            if tid not in before and name == "fastckpt-writer":
                (seen_after_wait if waited else seen_before_wait)[tid] = nice

    _watch_a_waited_save(tmp_path, look, started=lambda: bool(seen_before_wait))
    assert set(seen_before_wait.values()) == {19}, seen_before_wait
    expected = caller if _may_raise_priority() else 19
    assert seen_after_wait and expected in seen_after_wait.values(), seen_after_wait
    assert os.getpriority(os.PRIO_PROCESS, 0) == caller
