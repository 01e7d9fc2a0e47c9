"""Who gets the CPU while a checkpoint is written, read from the kernel (/proc): a background
save's writer threads run at the lowest priority, nice 19 (training keeps its cores, and
the write still ends while training runs), and use a quarter of the cores until someone
waits for them, then every core; a synchronous save, which its caller waits for, runs at
the caller's priority on every core; the caller's own thread is never changed.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import fastckpt
from children import bytes_written_by_thread, state_model, thread_states
from fastckpt import _fastckpt
from fastckpt._fastckpt import testing
from fastckpt.bench.machine import may_raise_priority
from strace_log import run_traced, write_size

SCHED_OTHER = 0


def _writers_while_saving(
    tmp_path,
    background: bool,
    threads: int | None = 2,
    name: str = "ckpt.weights.h5",
    wrote: set[int] | None = None,
    **kw,
) -> dict[int, tuple[str, int, int]]:
    """The threads a save started, as first seen while it runs (each payload write slowed
    down), before anyone waits for a background one; `wrote` gets those that passed bytes
    to write syscalls by then."""
    model = state_model(1024)
    before = set(thread_states())
    seen: dict[int, tuple[str, int, int]] = {}
    done = threading.Event()
    waited = threading.Event()
    wrote = set() if wrote is None else wrote

    def watch() -> None:
        while not done.is_set():
            written = bytes_written_by_thread()
            for tid, info in thread_states().items():
                if tid not in before and tid != threading.get_native_id():  # (not itself)
                    # As last seen before anyone waited (a wait changes the priority).
                    if not waited.is_set() or tid not in seen:
                        seen[tid] = info
                    if not waited.is_set() and written.get(tid, 0) > 0:
                        wrote.add(tid)
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
                # The job's own thread and its writers, which have written.
                started = sum(info[0] == "fastckpt-writer" for info in list(seen.values()))
                if started > want and len(wrote) >= want:
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
    """The threads that write a background save run at nice 19; the job's own thread,
    which writes nothing until someone waits (then at the caller's priority, which needs
    no privilege to keep), and does the little besides (open, metadata, rename), keeps the
    caller's priority."""
    caller = os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)
    wrote: set[int] = set()
    seen = _writers_while_saving(tmp_path, background=True, wrote=wrote)
    threads = {tid: info for tid, info in seen.items() if info[0] == "fastckpt-writer"}
    writers = {tid: info for tid, info in threads.items() if tid in wrote}
    assert len(writers) == 2, f"expected its 2 writers among {threads}, saw {wrote} write"
    assert all((policy, nice) == (SCHED_OTHER, 19) for _, policy, nice in writers.values()), writers
    coordinating = {tid: info for tid, info in threads.items() if tid not in wrote}
    assert len(coordinating) == 1, threads
    assert [info[1:] for info in coordinating.values()] == [caller], coordinating
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
    before = set(thread_states())
    wrote_by: dict[int, int] = {}  # tid -> bytes written while the save ran
    writers_before_wait: set[int] = set()

    def look(waited: bool) -> None:
        for tid, grown in bytes_written_by_thread().items():
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
    # Its writer, and the job's own thread, which joins once the save is waited for.
    assert len(writers) == _fastckpt.DEFAULT_THREADS, seen
    sync = _writers_while_saving(tmp_path, background=False, threads=None)
    # The caller's own thread writes too.
    assert len(sync) == _fastckpt.DEFAULT_THREADS - 1, sync


def test_a_background_save_waited_for_returns_to_the_callers_priority(tmp_path):
    """Training waits then: a writer left at nice 19 would get almost nothing of a core
    another process keeps busy. Where the process may raise a thread's priority again, the
    writers of a waited save run at the caller's nice value; where it may not, they stay
    at 19, and threads at the caller's priority write the rest (see
    `test_where_writers_cannot_leave_nice_19_threads_at_the_callers_priority_write`)."""
    caller = os.getpriority(os.PRIO_PROCESS, 0)
    before = set(thread_states())
    wrote_before_wait: set[int] = set()
    seen_before_wait: dict[int, int] = {}
    seen_after_wait: dict[int, int] = {}

    def look(waited: bool) -> None:
        written = bytes_written_by_thread()
        for tid, (name, _, nice) in thread_states().items():
            if tid not in before and name == "fastckpt-writer":
                (seen_after_wait if waited else seen_before_wait)[tid] = nice
                if not waited and written.get(tid, 0) > 0:
                    wrote_before_wait.add(tid)

    _watch_a_waited_save(tmp_path, look, started=lambda: bool(wrote_before_wait))
    assert {seen_before_wait[t] for t in wrote_before_wait} == {19}, seen_before_wait
    job_thread = set(seen_before_wait) - wrote_before_wait
    assert [seen_before_wait[t] for t in job_thread] == [caller], seen_before_wait
    expected = caller if may_raise_priority() else 19
    after = {seen_after_wait.get(t) for t in wrote_before_wait}
    assert after == {expected}, seen_after_wait
    assert os.getpriority(os.PRIO_PROCESS, 0) == caller


def test_where_writers_cannot_leave_nice_19_threads_at_the_callers_priority_write(tmp_path):
    """Most containers lack `CAP_SYS_NICE`: there a waited save's writers stay at nice 19,
    where another busy process leaves them almost nothing of a core (waits of seconds were
    seen). Once someone waits, they take no new piece while threads at the caller's
    priority (the job's own, and those it starts then) write the rest. Seen under strace, in a child
    whose `CAP_SYS_NICE` is dropped (`setpriv`) where this process has it."""
    prefix: list[str] = []
    if may_raise_priority():
        setpriv = shutil.which("setpriv")
        assert setpriv, "setpriv (util-linux) is needed to drop CAP_SYS_NICE for this test"
        prefix = [setpriv, "--inh-caps=-sys_nice", "--bounding-set=-sys_nice"]
    script = (
        "import sys\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "import children\n"
        "children.waited_save_marking_the_wait(*sys.argv[1:3])\n"
    )
    report_path = tmp_path / "report.json"
    calls = run_traced(
        script,
        [str(tmp_path / "ckpt.weights.h5"), str(report_path)],
        tmp_path / "strace.log",
        "write,pwrite64",
        prefix=prefix,
    )
    report = json.loads(report_path.read_text())
    assert report["may_raise"] is False, "the child could still raise a thread's priority"
    assert report["low"], "no writer at nice 19 was seen writing before the wait"
    mark = next(c for c in calls if c.name == "write" and "fastckpt-test: waiting" in c.args)
    after = [c for c in calls if c.name == "pwrite64" and c.start > mark.start]
    low = sum(write_size(c)[1] for c in after if c.tid in report["low"])
    others = sum(write_size(c)[1] for c in after if c.tid not in report["low"])
    piece = 8 << 20
    assert low <= piece + (256 << 10), (low, others)  # at most the piece in hand
    assert others >= 3 * piece, (low, others)
