"""What training feels: the stall per checkpoint, and the step time while a write runs.

Stall (performance.md, "What users feel" 1): the same `fit` of `steps` batches with and
without a checkpoint callback, interleaved; (with - without) / checkpoints, paired round by
round. The schedule saves every `every` steps and runs `every - 1` more after the last
save, so a background writer has time to finish before `fit` returns (if it has not, the
wait at the end of `fit` is part of the stall, as a user would feel it).

A whole `fit` varies by more than a background checkpoint costs on a shared 2-core machine,
so the callback is also timed directly: *blocked* is the time `fit` spent inside its hooks
per checkpoint (the snapshot, and any wait for the previous save), *end-of-fit wait* the
time `on_train_end` waited for the last save (once per `fit`, however long the run).
"""

from __future__ import annotations

import contextlib
import gc
import os
import statistics
import subprocess
import time
from typing import Any

import fastckpt
from fastckpt import _fastckpt, api, callbacks
from fastckpt.bench import floors
from fastckpt.bench.contenders import CallbackContender, TimedCallback, callback_contenders
from fastckpt.bench.context import Context, remove
from fastckpt.bench.machine import filesystem
from fastckpt.bench.measure import Stats, Trial, fmt_bytes, interleave
from fastckpt.bench.models import TrainingSetup, state_bytes, training_model
from fastckpt.bench.throughput import SNAPSHOT_FLOOR, first_save

NO_CALLBACK = "fit without a callback"
# The slowdown section's reference: the same bytes written by `dd` (`_RawWrites`).
RAW_WRITE = "raw write: dd of the same bytes, nice 19, bs=8M, conv=fdatasync"


def make_setup(ctx: Context) -> TrainingSetup:
    s = ctx.settings
    steps = s.stall_every * (s.stall_checkpoints + 1)
    return training_model(s.stall_weight_bytes, steps=max(steps, 64))


def case_name(setup: TrainingSetup) -> str:
    nbytes = state_bytes(setup.model)
    weights = state_bytes(setup.model, include_optimizer=False)
    return f"{fmt_bytes(weights)} weights + Adam = {fmt_bytes(nbytes)}"


def run_stall(ctx: Context, setup: TrainingSetup) -> None:
    s = ctx.settings
    steps = s.stall_every * (s.stall_checkpoints + 1) - 1
    nbytes = state_bytes(setup.model)
    case = case_name(setup)
    snap = floors.SnapshotFloor(floors.state_views(setup.model))
    contenders = callback_contenders(s.stall_formats)
    for c in contenders:
        if not c.available:
            ctx.add("stall", "*", case, c.label, family=c.family, available=False, note=c.note)
    contenders = [c for c in contenders if c.available]
    extra: dict[str, Any] = {
        "state_bytes": nbytes,
        "steps": steps,
        "checkpoints": s.stall_checkpoints,
        "save_every": s.stall_every,
    }
    families = {c.label: c.family for c in contenders}
    notes = {c.label: c.note for c in contenders}
    for i, target in enumerate(ctx.targets):
        if i == 0:  # the first fit of a model and its first fastckpt save are one-time costs
            setup.fit(s.stall_every)
            first_save(ctx, "stall", target, case, setup.model, **extra)
        trials = [Trial(NO_CALLBACK, lambda: _timed_fit(setup, steps, None))]
        if i == 0:
            trials.append(Trial(SNAPSHOT_FLOOR, snap))
        for c in contenders:
            path = ctx.path(target, f"cb{c.suffix}" if c.suffix else "orbax")

            def fit_with(c: CallbackContender = c, path: str = path) -> dict[str, float]:
                return _timed_fit(setup, steps, TimedCallback(c.make(path, s.stall_every)))

            def cleanup(path: str = path) -> None:
                remove(path)

            trials.append(Trial(c.label, fit_with, cleanup=cleanup))
        ctx.progress.say(
            f"stall: {case} on {target}: {len(trials)} contenders x {s.stall_reps} rounds, "
            f"{steps} steps, {s.stall_checkpoints} checkpoints per fit"
        )
        results = interleave(
            trials,
            s.stall_reps,
            on_rep=lambda r: ctx.progress.say(f"  round {r + 1}/{s.stall_reps} done"),
        )
        base = results[NO_CALLBACK]["seconds"].runs
        for name, stats in results.items():
            if name in families:
                runs = stats["seconds"].runs
                stall = [(w - b) / s.stall_checkpoints for w, b in zip(runs, base, strict=True)]
                blocked = [b / s.stall_checkpoints for b in stats["blocked"].runs]
                stats = {**stats, "stall": Stats(stall), "blocked": Stats(blocked)}
            ctx.add(
                "stall",
                target,
                case,
                name,
                stats,
                family=families.get(name, "floor" if name == SNAPSHOT_FLOOR else "baseline"),
                note=notes.get(name, ""),
                **extra,
            )
        ctx.clear(target)
    del snap
    gc.collect()


def _timed_fit(setup: TrainingSetup, steps: int, callback: TimedCallback | None) -> dict:
    start = time.perf_counter()
    setup.fit(steps, [callback] if callback is not None else None)
    out = {"seconds": time.perf_counter() - start}
    if callback is not None:
        out["blocked"] = callback.seconds - callback.end_seconds
        out["end_of_fit_wait"] = callback.end_seconds
    return out


def run_slowdown(ctx: Context, setup: TrainingSetup) -> None:
    """Step times with no write running, and while a background `fastckpt.save` runs.

    Rounds alternate: a window of steps with nothing running, then a background save and
    steps until it is done. Each step is timed alone (`train_on_batch`). Run with the
    default writer threads of a background save and with another count (a synchronous
    save's default, or one), since on a small machine the writers and the training step
    share the cores; where the target has direct I/O (not tmpfs), once more with it
    switched off (`FASTCKPT_DIRECT_IO=0`) to show what the page cache costs; and, as the
    reference, the same bytes written by `dd` (`_RawWrites`)."""
    s = ctx.settings
    case = case_name(setup)
    nbytes = state_bytes(setup.model)
    for i in range(3):  # warm up the step
        setup.step(i)
    for target in ctx.targets:
        default = _fastckpt.DEFAULT_BACKGROUND_THREADS
        other = _fastckpt.DEFAULT_THREADS if _fastckpt.DEFAULT_THREADS != default else 1
        # (threads, direct I/O, cycle): first as `ModelCheckpoint` writes, each save into
        # the file the one before it replaced and kept (on tmpfs through the mapping kept
        # of it); then new files.
        variants = [(default, True, True), (default, True, False), (other, True, False)]
        if filesystem(ctx.targets[target])["fstype"] != "tmpfs":
            variants.append((default, False, False))
        path = ctx.path(target, "slowdown.weights.h5")
        for threads, direct, cycle in variants:
            with _direct_io(direct):
                stats = _slowdown_rounds(ctx, setup, _Saves(setup, path, threads, cycle))
            n = stats["step_during_write"].runs if "step_during_write" in stats else []
            how = f"{threads} writer thread(s)" + ("" if direct else ", buffered")
            ctx.progress.say(
                f"slowdown: {case} on {target}, {how}: {len(n)} steps "
                f"during {s.slowdown_saves} writes"
            )
            label = f"{threads} thread{'s' if threads > 1 else ''}"
            if threads == default:
                label += ", the default"
            if not direct:
                label += ", buffered: FASTCKPT_DIRECT_IO=0"
            label += ", into the kept file, as ModelCheckpoint" if cycle else ", a new file"
            ctx.add(
                "slowdown",
                target,
                case,
                f"fastckpt .weights.h5 (background, {label})",
                stats,
                family="fastckpt",
                state_bytes=nbytes,
                threads=threads,
                direct_io=direct,
                cycle=cycle,
            )
        if floors.dd_available():
            direct = filesystem(ctx.targets[target])["fstype"] != "tmpfs"
            raw = _RawWrites(ctx.path(target, "slowdown.dd"), nbytes, direct)
            stats = _slowdown_rounds(ctx, setup, raw)
            ctx.progress.say(f"slowdown: {case} on {target}, dd: the raw write of the bytes")
            ctx.add(
                "slowdown",
                target,
                case,
                RAW_WRITE + (", oflag=direct" if direct else ""),
                stats,
                family="floor",
                state_bytes=nbytes,
                threads=1,
                direct_io=direct,
                cycle=False,
            )
        ctx.clear(target)


@contextlib.contextmanager
def _direct_io(on: bool):
    """Direct I/O as the default (`on`), or switched off by its environment variable."""
    before = os.environ.get("FASTCKPT_DIRECT_IO")
    if not on:
        os.environ["FASTCKPT_DIRECT_IO"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("FASTCKPT_DIRECT_IO", None)
        else:
            os.environ["FASTCKPT_DIRECT_IO"] = before


class _Saves:
    """fastckpt's background saves of the model: with `cycle`, each into the file the save
    before it replaced, as `ModelCheckpoint` does (`callbacks._kept`), after two saves
    not counted that make the first files; without, every save into a new file."""

    def __init__(self, setup: TrainingSetup, path: str, threads: int, cycle: bool) -> None:
        self.setup, self.path, self.threads, self.cycle = setup, path, threads, cycle
        self.spare: Any = None
        if cycle:
            for _ in range(2):
                job = api.start_save(
                    setup.model, path, background=True, threads=threads, keep_replaced=True
                )
                job.result()
                self.spare = callbacks._kept(job) or self.spare

    def start(self) -> Any:
        model, spare = self.setup.model, self.spare
        if not self.cycle:
            return fastckpt.save(model, self.path, background=True, threads=self.threads)
        return api.start_save(
            model,
            self.path,
            background=True,
            threads=self.threads,
            reuse=None if spare is None else spare.path,
            queue_after=[] if spare is None or spare.reserving is None else [spare.reserving],
            keep_replaced=True,
        )

    @staticmethod
    def done(job: Any) -> bool:
        return bool(job.done())

    def finish(self, job: Any) -> None:
        job.result()
        if self.cycle:
            self.spare = callbacks._kept(job)
        else:
            remove(self.path)

    def close(self) -> None:
        if not self.cycle:
            return
        # The kept file, and the mappings kept of it and of the checkpoint.
        if self.spare is not None:
            if self.spare.reserving is not None:
                self.spare.reserving.wait()
            remove(self.spare.path)
        _fastckpt.release_mappings()


class _RawWrites:
    """The same bytes (rounded up to 8 MiB) written by `dd` at nice 19 in 8 MiB blocks,
    with direct I/O where the target has it, then fdatasync'd: what the device's own write
    takes from training, beside which the writer's is read. A direct write takes little
    CPU in the process, yet where the device's work falls on the cores that train (a
    virtual machine's disk) the steps still slow down."""

    def __init__(self, path: str, nbytes: int, direct: bool) -> None:
        blocks = -(-nbytes // (8 << 20))
        self.cmd = ["nice", "-n", "19", "dd", "if=/dev/zero", f"of={path}", "bs=8M"]
        self.cmd += [f"count={blocks}", "conv=fdatasync", "status=none"]
        if direct:
            self.cmd.append("oflag=direct")
        self.path = path

    def start(self) -> subprocess.Popen[str]:
        return subprocess.Popen(self.cmd, stderr=subprocess.PIPE, text=True)

    @staticmethod
    def done(proc: subprocess.Popen[str]) -> bool:
        return proc.poll() is not None

    def finish(self, proc: subprocess.Popen[str]) -> None:
        _, err = proc.communicate()
        remove(self.path)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(self.cmd)} failed: {err.strip()}")

    def close(self) -> None:
        pass


def _slowdown_rounds(ctx: Context, setup: TrainingSetup, writes: _Saves | _RawWrites) -> dict:
    """Windows of steps with nothing running, each followed by a write and the steps until
    it is done."""
    quiet: list[float] = []
    during: list[float] = []
    blocked: list[float] = []
    write: list[float] = []
    # What each write took from training in all: its steps' time over as many steps of
    # the window before it (a writer that takes its CPU more slowly shows a smaller ratio
    # over more steps; this is the same either way).
    lost: list[float] = []
    i = 0
    window = 4
    try:
        for _ in range(ctx.settings.slowdown_saves):
            gc.collect()
            before = len(quiet)
            for _ in range(window):
                t = time.perf_counter()
                setup.step(i)
                quiet.append(time.perf_counter() - t)
                i += 1
            usual = statistics.median(quiet[before:])
            start = time.perf_counter()
            job = writes.start()
            blocked.append(time.perf_counter() - start)
            steps = 0
            while not writes.done(job):
                t = time.perf_counter()
                setup.step(i)
                during.append(time.perf_counter() - t)
                i += 1
                steps += 1
            writes.finish(job)
            write.append(time.perf_counter() - start)
            lost.append(sum(during[len(during) - steps :]) - steps * usual)
            window = max(4, steps)
    finally:
        writes.close()
    stats = {
        "step_quiet": Stats(quiet),
        "blocked": Stats(blocked),
        "write": Stats(write),
        "lost_per_write": Stats(lost),
    }
    if during:
        stats["step_during_write"] = Stats(during)
    return stats
